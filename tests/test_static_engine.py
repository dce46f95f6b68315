"""The fast rollout engine ("static") and the lean update path: same tokens as HF generate under greedy fp32
decoding, the same log-probs as a teacher-forced pass, finished rows compacted away without changing
anything, exact sampling frequencies, and a shared-prompt forward equal to the full one (values and
gradients)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_rlhf.models import cpu_linear
from lightning_rlhf.rollout import ROLLOUT_ENGINES, SamplingParams, sequence_logprobs
from lightning_rlhf.rollout import decode_step, lean_llama, static, teacher_forcing
from lightning_rlhf.rollout.static import filter_logits, sample_tokens

PAD, EOS = 0, 1
EOS_SET = list(range(1, 40))  # with a vocabulary of 512: about 8% per step, so rows end at different times


def llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)
    return LlamaForCausalLM(cfg).eval()


def qwen2(seed: int = 0) -> Qwen2ForCausalLM:  # q/k/v biases, another model_type
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # non-zero, so a dropped bias would show
    return model


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 4, 6 and 3."""
    torch.manual_seed(7)
    ids = torch.randint(40, 500, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :3] = 0
    return torch.where(mask > 0, ids, PAD), mask


def run(engine: str, model, **kw):
    ids, mask = prompts()
    args = dict(eos_token_id=EOS_SET, pad_token_id=PAD, max_new_tokens=16, **kw)
    return ROLLOUT_ENGINES.get(engine)(**args.pop("engine_kwargs", {})).generate(model, ids, mask, **args)


@pytest.mark.parametrize("make", [llama, qwen2])
@pytest.mark.parametrize("layout", ["packed", "stacked", "separate"])
@pytest.mark.parametrize("fused", [False, None, "ops"])  # None: the fused CPU kernels where they build (for these
def test_greedy_fp32_gives_hf_generate_tokens(make, layout, fused, monkeypatch):  # small models, the one-call step)
    if fused == "ops":  # the per-operation fused kernels, as a larger model gets them
        monkeypatch.setattr(decode_step, "SMALL_STEP_BYTES", 0)
        fused = None
    # packed: every projection in oneDNN's layout, q/k/v and gate/up as one stacked matmul each (what a large
    # model gets where packing pays); stacked: the same stacks unpacked (a small model); separate: one matmul per
    # projection on the parameters themselves (a large model where packing does not pay)
    packed = layout == "packed"
    if packed and not cpu_linear.onednn_available():
        pytest.skip("no oneDNN float32 linear here")
    monkeypatch.setattr(cpu_linear.PackedLinear, "pays", staticmethod(lambda like, rows, out_features=None: packed))
    monkeypatch.setattr(lean_llama, "STACK_COPY_BYTES", 0 if layout == "separate" else 1 << 30)
    model = make()
    layer = lean_llama.LeanLlama.from_model(model, fused=False).layers[0]  # (the one-call step has no projections)
    assert (len(layer.qkv.linears), len(layer.gate_up.linears)) == ((3, 2) if layout == "separate" else (1, 1))
    assert layer.qkv.linears[0].packed == packed
    hf, fast = run("hf", model, greedy=True), run("static", model, greedy=True, engine_kwargs={"cpu_kernels": fused})
    assert torch.equal(hf.response_ids, fast.response_ids)
    assert torch.equal(hf.response_mask, fast.response_mask) and torch.equal(hf.truncated, fast.truncated)
    assert len(set(fast.response_lengths.tolist())) > 1  # rows ended at different steps
    assert (hf.logprobs - fast.logprobs).abs().max() < 1e-5


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=20, top_p=0.9),
                                dict(temperature=1.0, engine_kwargs={"max_batch_size": 4}),
                                dict(temperature=1.0, engine_kwargs={"compact_below": 1.0}),
                                dict(temperature=1.0, engine_kwargs={"compact_below": 0.0})])
def test_sampling_logprobs_match_teacher_forcing(kw):
    # compact_below 1.0 compacts after every finished row, 0.0 never: the log-probs agree either way
    model = llama()
    torch.manual_seed(3)
    ro = run("static", model, num_generations=8, **kw)
    with torch.no_grad():
        tf = sequence_logprobs(model, ro, temperature=kw["temperature"])
    real = ro.response_mask > 0
    assert ro.response_lengths.min() < ro.response_lengths.max()
    assert (tf - ro.logprobs)[real].abs().max() < 1e-4
    assert (ro.logprobs[~real] == 0).all() and (ro.response_ids[~real] == PAD).all()


def test_min_new_tokens_forces_lengths_in_both_engines():
    model = llama()
    for engine in ("hf", "static"):
        ro = run(engine, model, num_generations=2, min_new_tokens=16)
        assert ro.response_lengths.tolist() == [16] * 6, engine  # no eos before 16 tokens, truncated at 16
    with pytest.raises(ValueError, match="min_new_tokens must be in"):
        run("static", model, min_new_tokens=17)


def test_sampling_frequencies_match_the_distribution():
    # probabilities [0.1, 0.2, 0.3, 0.4] from their logs; 40000 draws: standard error <= 0.0025 per token
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(40000, 4).contiguous()
    params = SamplingParams(eos_token_id=99, pad_token_id=0, temperature=1.0)
    torch.manual_seed(0)
    tokens, logp = sample_tokens(logits, params, ban_eos=False)
    freq = torch.bincount(tokens, minlength=4).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.012, rtol=0)
    torch.testing.assert_close(logp, logits.gather(-1, tokens[:, None])[:, 0])  # log-prob of the drawn token
    # top-k 2 keeps tokens 2 and 3: 0.3 / 0.7 and 0.4 / 0.7
    tokens, _ = sample_tokens(logits, SamplingParams(eos_token_id=99, pad_token_id=0, top_k=2), ban_eos=False)
    freq = torch.bincount(tokens, minlength=4).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]), atol=0.012, rtol=0)
    # banning eos (token 3) leaves 0.1, 0.2, 0.3 renormalised: 1/6, 2/6, 3/6
    tokens, logp = sample_tokens(logits, SamplingParams(eos_token_id=3, pad_token_id=0), ban_eos=True)
    freq = torch.bincount(tokens, minlength=4).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([1 / 6, 2 / 6, 3 / 6, 0.0]), atol=0.012, rtol=0)
    torch.testing.assert_close(logp, logits.gather(-1, tokens[:, None])[:, 0])  # of the unbanned distribution


def test_two_level_cdf_inversion_picks_the_token_of_the_full_cumulative_sum(monkeypatch):
    # weights [0.1, 0.2, 0, 0.3, 0.4] in blocks of 2: sums .3 / .3 / .4, block cdf .3 / .6 / 1.0
    monkeypatch.setattr(static, "CDF_BLOCK", 2)
    monkeypatch.setattr(static, "ONE_LEVEL_MAX", 0)  # two levels at every size
    w = torch.tensor([[0.1, 0.2, 0.0, 0.3, 0.4]]).expand(3, 5)
    u = torch.tensor([[0.5], [0.25], [1.0]], dtype=torch.float64)
    # u .5: block 1 (.6 >= .5), inside .3 + [0, .3] = [.3, .6] -> its 2nd entry, token 3
    # u .25: block 0 (.3 >= .25), inside [.1, .3] -> token 1 (token 2's weight is 0: never picked)
    # u 1.0: the last block (a single entry, the other masked to 0): .6 + [.4, .4] -> token 4
    assert static._invert_cdf(w, u).tolist() == [3, 1, 4]
    # against the full-length float64 cumulative sum, on vocabularies that do and do not fill the last block
    torch.manual_seed(0)
    for v, one_level_max in ((7, 0), (8, 0), (301, 0), (301, 2048)):
        monkeypatch.setattr(static, "ONE_LEVEL_MAX", one_level_max)
        w = (torch.randn(32, v) * 3).softmax(-1)
        w[:, ::3] = 0.0
        for _ in range(20):
            u = 1.0 - torch.rand(32, 1, dtype=torch.float64)
            cdf = w.cumsum(-1, dtype=torch.float64)
            assert torch.equal(static._invert_cdf(w, u), torch.searchsorted(cdf, u * cdf[:, -1:])[:, 0])
        picked = static._invert_cdf(w, torch.ones(32, 1, dtype=torch.float64))
        assert (w.gather(-1, picked[:, None]) > 0).all()


def test_banned_eos_holding_all_the_float32_mass_still_gives_another_token():
    # logits [0, -200, -210]: softmax in float32 puts 1.0 on eos (token 0), exp(-200) underflows to 0, so the
    # non-eos weights are all 0; the general path renormalises the banned logits: token 1 with e^-200 / (e^-200 +
    # e^-210) = 1 / (1 + e^-10) = 0.99995; log-probs of the unbanned distribution: -200 and -210
    logits = torch.tensor([[0.0, -200.0, -210.0]]).expand(2000, 3).contiguous()
    torch.manual_seed(0)
    tokens, logp = sample_tokens(logits, SamplingParams(eos_token_id=0, pad_token_id=0), ban_eos=True)
    assert (tokens != 0).all() and int((tokens == 1).sum()) >= 1990
    torch.testing.assert_close(logp, torch.where(tokens == 1, -200.0, -210.0))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # mass before each token (sorted): 0, 0.5, 0.8, 0.95; top_p 0.75 keeps the first two, 0.85 the first three
    assert torch.isinf(filter_logits(logits, 0, 0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.85)).tolist() == [[False, False, False, True]]


def test_other_architectures_fall_back_to_hf(caplog):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with caplog.at_level("WARNING"):
        fast = run("static", gpt2, greedy=True)
    assert "model_type 'gpt2'" in caplog.text and "'hf' engine" in caplog.text
    assert torch.equal(fast.response_ids, run("hf", gpt2, greedy=True).response_ids)


def test_bfloat16_sampling_is_close_to_float32():
    model = llama()
    torch.manual_seed(3)
    ro = run("static", model, num_generations=4, temperature=1.0, engine_kwargs={"dtype": "bfloat16"})
    with torch.no_grad():
        tf = sequence_logprobs(model, ro)  # float32
    real = ro.response_mask > 0
    assert 0 < (tf - ro.logprobs)[real].abs().mean() < 0.05  # different, by bf16 rounding only


@pytest.mark.parametrize("tied,shuffled", [(False, False), (True, False), (False, True)])
def test_shared_prompt_forward_equals_full_forward_with_gradients(monkeypatch, tied, shuffled):
    model = llama(tie_word_embeddings=tied)  # tied: the embedding's gradient comes from the lm head and the lookup
    torch.manual_seed(3)
    ro = run("static", model, num_generations=4, temperature=1.0)
    if shuffled:  # rows that share a prompt no longer consecutive: the prompts are matched up by torch.unique
        ro = ro.select(torch.randperm(len(ro)))
    spread = []  # grouped rows take the broadcast copy of the prompt's cache; shuffled ones a reordering
    spread_cache = teacher_forcing._spread_cache
    monkeypatch.setattr(teacher_forcing, "_spread_cache", lambda *a: spread.append(spread_cache(*a)))
    with torch.no_grad():
        assert teacher_forcing._shared_prompt_logits(model, ro) is not None  # the shared path is the one tested
    assert len(spread) == (not shuffled)
    assert (teacher_forcing._tied_embedding(model) is not None) == tied  # tied: its lookup's gradient is sparse
    weights = torch.randn(ro.logprobs.shape)
    full_model = copy.deepcopy(model)
    shared = sequence_logprobs(model, ro)
    (shared * weights).sum().backward()
    monkeypatch.setattr(teacher_forcing, "_shared_prompt_logits", lambda m, r: None)  # the plain full forward,
    monkeypatch.setattr(teacher_forcing, "_sparse_tied_lookup", lambda m: contextlib.nullcontext())  # dense lookup
    full = sequence_logprobs(full_model, ro)
    (full * weights).sum().backward()
    torch.testing.assert_close(shared, full, atol=2e-6, rtol=0)
    for a, b in zip(model.parameters(), full_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("packed", [False, True])
def test_sampling_under_a_stages_bf16_autocast_keeps_the_engines_precision(engine, packed, monkeypatch):
    # a bf16-mixed stage samples inside torch.autocast: the engine turns it off, so a float32 model samples in
    # float32 (the same tokens and log-probs as outside autocast; packed oneDNN weights used to get bfloat16
    # inputs there and fail)
    if packed and not cpu_linear.onednn_available():
        pytest.skip("no oneDNN float32 linear here")
    monkeypatch.setattr(cpu_linear.PackedLinear, "pays", staticmethod(lambda like, rows, out_features=None: packed))
    model = llama()
    plain = run(engine, model, greedy=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run(engine, model, greedy=True)
    assert torch.equal(plain.response_ids, mixed.response_ids) and torch.equal(plain.logprobs, mixed.logprobs)
