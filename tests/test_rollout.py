"""Tests for lightning_rlhf.rollout: the Rollout container, the HF generate engine, teacher forcing.

The central one is the parity test: the logprobs captured while sampling must equal a teacher-forced
forward on the same tokens (what trainers compute for the policy), within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from lightning_rlhf.rollout import ROLLOUT_ENGINES, HFGenerateEngine, Rollout, SamplingParams, sequence_logprobs
from lightning_rlhf.rollout.base import response_mask_from_eos

PAD, EOS, BOS, VOCAB = 0, 1, 2, 64


def tiny_model(eos_bias: float = 0.0, logit_scale: float = 20.0, seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama of the brief, with an lm_head that has a bias (to push the eos logit).

    Random init gives logits of std ~0.1 (an almost uniform distribution, where a wrong temperature
    would hardly show), so the head weights are scaled by `logit_scale` (std ~2).
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
            bos_token_id=BOS,
        )
    )
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * logit_scale)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head
    return model.eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 2, 5 and 3 (ids >= 3, so no pad/eos/bos inside)."""
    ids = torch.tensor([[0, 0, 0, 7, 8], [3, 4, 5, 6, 7], [0, 0, 9, 10, 11]])
    return ids, (ids != PAD).long()


def generate(model, engine: str = "hf", **kw) -> Rollout:
    ids, mask = prompts()
    args = dict(num_generations=4, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    args.update(kw)
    return ROLLOUT_ENGINES.get(engine)(max_batch_size=args.pop("max_batch_size", None)).generate(model, ids, mask, **args)


# ----- 1. parity: sampling-time logprobs == teacher-forced logprobs ---------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7),
        dict(temperature=1.0),
        dict(greedy=True),
        # top-p/top-k truncate the sampling but not the logprob (documented choice): parity still holds
        dict(temperature=0.7, top_p=0.9, top_k=10),
        dict(temperature=0.7, max_batch_size=5),  # 12 rows in chunks of 5, 5, 2
    ],
)
@pytest.mark.parametrize("engine", ["hf", "static"])
def test_engine_logprobs_match_teacher_forcing(kw, engine):
    model = tiny_model(eos_bias=2.0)  # eos ~10% per step: rows of different lengths, some truncated
    torch.manual_seed(1)
    r = generate(model, engine, **kw)
    temp = 1.0 if kw.get("greedy") else kw["temperature"]
    with torch.no_grad():
        tf = sequence_logprobs(model, r, temperature=temp)
    real = r.response_mask > 0
    assert r.num_tokens > 12  # more than one token per row on average: the check below is not empty
    assert (r.logprobs[real] < 0).all()
    assert (tf - r.logprobs)[real].abs().max().item() < 1e-4
    assert (tf[~real] == 0).all() and (r.logprobs[~real] == 0).all()
    if temp != 1.0:  # the temperature matters: scoring at temperature 1 does NOT match
        with torch.no_grad():
            tf1 = sequence_logprobs(model, r, temperature=1.0)
        assert (tf1 - r.logprobs)[real].abs().max().item() > 1e-2


def test_sequence_logprobs_extras_against_full_forward():
    model = tiny_model(eos_bias=2.0)
    torch.manual_seed(2)
    r = generate(model, temperature=0.8)
    p, t = r.prompt_ids.shape[1], r.response_ids.shape[1]
    with torch.no_grad():
        logp, extras = sequence_logprobs(model, r, 0.8, return_entropy=True, return_logits=True)
        # Independent route: full forward (no logits_to_keep), slice positions P-1 .. P+T-2 by hand.
        full = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=r.position_ids).logits
    scaled = full[:, p - 1 : p + t - 1].float() / 0.8
    real = r.response_mask > 0
    expected_logp = torch.log_softmax(scaled, -1).gather(-1, r.response_ids[..., None]).squeeze(-1)
    expected_ent = -(torch.softmax(scaled, -1) * torch.log_softmax(scaled, -1)).sum(-1)
    assert extras["logits"].shape == (len(r), t, VOCAB)
    assert torch.allclose(extras["logits"], scaled, atol=1e-5)
    assert torch.allclose(logp[real], expected_logp[real], atol=1e-5)
    assert torch.allclose(extras["entropy"][real], expected_ent[real], atol=1e-5)
    assert (extras["entropy"][~real] == 0).all()
    # entropy of a V=64 distribution lies in (0, log 64 = 4.159)
    assert (extras["entropy"][real] > 0).all() and (extras["entropy"][real] < 4.159).all()


def test_sequence_logprobs_has_gradients():
    model = tiny_model(eos_bias=2.0)
    torch.manual_seed(3)
    r = generate(model, temperature=1.0)
    logp = sequence_logprobs(model, r)
    logp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


# ----- 2. grouping -----------------------------------------------------------------------------------
def test_num_generations_repeats_prompts_consecutively():
    model = tiny_model()
    ids, mask = prompts()
    r = generate(model, num_generations=3, temperature=1.0)
    assert r.group_size == 3 and len(r) == 9 and r.num_prompts == 3
    for i in range(3):
        for row in range(3 * i, 3 * i + 3):  # rows 3i .. 3i+2 belong to prompt i
            assert torch.equal(r.prompt_ids[row], ids[i])
            assert torch.equal(r.prompt_mask[row], mask[i])


# ----- 3. eos handling -------------------------------------------------------------------------------
def test_response_mask_from_eos_by_hand():
    tokens = torch.tensor([[5, 1, 0, 0], [5, 6, 7, 8], [1, 1, 1, 1], [4, 9, 1, 3]])
    # row 0: eos at t=1 -> mask 1,1,0,0; row 1: no eos -> all 1, truncated; row 2: pad == eos case,
    # only the first counts -> 1,0,0,0; row 3 with eos ids {1, 9}: first eos (9) at t=1 -> 1,1,0,0.
    mask, truncated = response_mask_from_eos(tokens, [1, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]
    mask, truncated = response_mask_from_eos(tokens, 1)
    assert mask[3].tolist() == [1, 1, 1, 0] and truncated.tolist() == [False, True, False, False]


@pytest.mark.parametrize("pad", [PAD, EOS])  # also pad == eos, as with many tokenizers
def test_tokens_after_eos_are_padding(pad):
    model = tiny_model(eos_bias=2.0)
    torch.manual_seed(4)
    r = generate(model, temperature=1.0, pad_token_id=pad)
    lengths = r.response_lengths.tolist()
    assert len(set(lengths)) > 1  # rows really end at different steps
    for row, n in enumerate(lengths):
        toks = r.response_ids[row].tolist()
        if r.truncated[row]:
            assert n == 12 and EOS not in toks  # ran to max_new_tokens with no eos
        else:
            assert toks[n - 1] == EOS and EOS not in toks[: n - 1]  # the first eos is the last real token
        assert all(tok == pad for tok in toks[n:])
        assert r.response_mask[row, :n].eq(1).all() and r.response_mask[row, n:].eq(0).all()
        assert r.logprobs[row, n:].eq(0).all() and r.logprobs[row, :n].lt(0).all()
    assert r.truncated.any() and not r.truncated.all()


def test_eos_impossible_means_all_truncated():
    model = tiny_model(eos_bias=-1e4)  # exp(-1e4) == 0 in float32: eos is never sampled
    torch.manual_seed(5)
    r = generate(model, temperature=1.0, max_new_tokens=9)
    assert r.response_ids.shape == (12, 9)
    assert r.truncated.all() and (r.response_ids != EOS).all()
    assert r.response_mask.eq(1).all() and r.response_lengths.tolist() == [9] * 12


def test_eos_certain_stops_generation_early():
    model = tiny_model(eos_bias=40.0)  # eos logit ~40 vs others ~N(0, 2): p(eos) ~ 1
    # The model's own generation_config would forbid eos for 5 tokens and add penalties: the engine
    # must ignore it (its logprobs could not reflect it) and restore it afterwards.
    model.generation_config = GenerationConfig(min_new_tokens=5, repetition_penalty=2.0, do_sample=True)
    torch.manual_seed(6)
    r = generate(model, temperature=1.0, max_new_tokens=10)
    assert r.response_ids.shape == (12, 1)  # all rows finished at step 1: T < max_new_tokens
    assert (r.response_ids == EOS).all() and not r.truncated.any()
    assert r.response_mask.eq(1).all()
    # log p(eos) = -log(1 + sum_v exp(z_v - z_eos)) ~ -63 * exp(-40 + ~2) ~ -1e-15 -> 0 in float32
    assert r.logprobs.abs().max() < 1e-6
    assert model.generation_config.min_new_tokens == 5


# ----- 4. determinism --------------------------------------------------------------------------------
def test_greedy_is_deterministic_argmax():
    model = tiny_model(eos_bias=2.0)
    a, b = generate(model, greedy=True), generate(model, greedy=True)
    assert torch.equal(a.response_ids, b.response_ids)
    with torch.no_grad():
        _, extras = sequence_logprobs(model, a, return_logits=True)
    real = a.response_mask > 0
    # each greedy token is the argmax of the teacher-forced logits at its position
    assert torch.equal(extras["logits"].argmax(-1)[real], a.response_ids[real])
    # all 4 generations of a prompt are identical under greedy
    assert torch.equal(a.response_ids[0], a.response_ids[3])


def test_sampling_reproducible_with_seed():
    model = tiny_model(eos_bias=-1e4)  # fixed length, so the comparison covers every token
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(generate(model, temperature=1.0).response_ids)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_train_mode_is_restored():
    model = tiny_model()
    model.train()
    generate(model, temperature=1.0, max_new_tokens=2)
    assert model.training
    model.eval()
    generate(model, temperature=1.0, max_new_tokens=2)
    assert not model.training


# ----- 5. Rollout container --------------------------------------------------------------------------
def hand_rollout() -> Rollout:
    return Rollout(
        prompt_ids=torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]]),
        prompt_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
        response_ids=torch.tensor([[7, 1, 0], [1, 0, 0]]),
        response_mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        logprobs=torch.tensor([[-0.5, -0.25, 0.0], [-1.0, 0.0, 0.0]]),
        truncated=torch.tensor([False, False]),
        group_size=2,
    )


def test_rollout_derived_tensors():
    r = hand_rollout()
    assert r.input_ids.tolist() == [[0, 0, 5, 6, 7, 1, 0], [3, 4, 5, 6, 1, 0, 0]]
    assert r.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]
    # row 0: cumsum = 0,0,1,2,3,4,4 -> minus 1 = -1,-1,0,1,2,3,3 -> clamp at 0 = 0,0,0,1,2,3,3
    # row 1: cumsum = 1,2,3,4,5,5,5 -> minus 1 = 0,1,2,3,4,4,4
    assert r.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 4, 4]]
    assert r.response_lengths.tolist() == [2, 1]
    assert r.num_tokens == 3  # 2 + 1


def test_rollout_select_split_to():
    model = tiny_model()
    r = generate(model, num_generations=2, temperature=1.0, max_new_tokens=5)  # 6 rows, groups of 2
    parts = r.split(4)
    assert [len(p) for p in parts] == [4, 2] and [p.group_size for p in parts] == [2, 2]
    assert torch.equal(torch.cat([p.response_ids for p in parts]), r.response_ids)
    assert [p.group_size for p in r.split(3)] == [1, 1]  # 3 rows are not whole groups of 2
    s = r.select([5, 0])
    assert s.prompt_ids.shape == (2, 5) and s.response_ids.shape == (2, r.response_ids.shape[1])
    assert torch.equal(s.logprobs[0], r.logprobs[5]) and torch.equal(s.truncated[1:], r.truncated[:1])
    assert s.group_size == 1
    assert len(r.select(torch.tensor([True, False, True, False, False, False]))) == 2
    moved = r.to("cpu")
    assert moved.response_mask.device.type == "cpu" and moved.group_size == 2
    with pytest.raises(ValueError, match="minibatch_size"):
        r.split(0)


def test_rollout_rejects_inconsistent_shapes():
    good = hand_rollout()
    with pytest.raises(ValueError, match="logprobs"):
        Rollout(**{**good.__dict__, "logprobs": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="group_size"):
        Rollout(**{**good.__dict__, "group_size": 3})


def test_decode_drops_padding_and_special_tokens():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "a": 3, "b": 4, "c": 5, "d": 6, "e": 7}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    r = hand_rollout()
    # row 0 response: 7 ("e"), 1 (eos: special, dropped), 0 (padding) -> "e"; row 1: only eos -> ""
    assert r.decode(hf_tok) == ["e", ""]


# ----- input checks and registry ---------------------------------------------------------------------
def test_bad_arguments_name_the_fix():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="padding_side"):
        HFGenerateEngine().generate(model, ids, (ids != 0).long(), eos_token_id=EOS, pad_token_id=PAD)
    ids, mask = prompts()
    with pytest.raises(ValueError, match="temperature"):
        HFGenerateEngine().generate(model, ids, mask, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_token"):
        HFGenerateEngine().generate(model, ids, mask, eos_token_id=EOS, pad_token_id=None)
    with pytest.raises(ValueError, match="num_generations"):
        HFGenerateEngine().generate(model, ids, mask, num_generations=0, eos_token_id=EOS, pad_token_id=PAD)


def test_sampling_params_object_and_keywords_agree():
    model = tiny_model()
    ids, mask = prompts()
    params = SamplingParams(num_generations=2, max_new_tokens=5, greedy=True, eos_token_id=EOS, pad_token_id=PAD)
    by_object = HFGenerateEngine().generate(model, ids, mask, params)
    by_keywords = HFGenerateEngine().generate(model, ids, mask, num_generations=2, max_new_tokens=5, greedy=True,
                                              eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(by_object.response_ids, by_keywords.response_ids)
    assert torch.equal(by_object.logprobs, by_keywords.logprobs)
    overridden = HFGenerateEngine().generate(model, ids, mask, params, num_generations=1)  # keywords win
    assert len(overridden) == ids.shape[0] and overridden.group_size == 1
    with pytest.raises(TypeError, match="top_pp"):
        HFGenerateEngine().generate(model, ids, mask, top_pp=0.9, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(TypeError, match="pad_token_id"):
        HFGenerateEngine().generate(model, ids, mask, eos_token_id=EOS)  # required, as before
    assert SamplingParams(eos_token_id=[EOS, 5], pad_token_id=PAD).eos_ids == [EOS, 5]


def test_registry():
    assert ROLLOUT_ENGINES.get("hf") is HFGenerateEngine
    with pytest.raises(ValueError, match="hf"):
        ROLLOUT_ENGINES.get("vllm_typo")
