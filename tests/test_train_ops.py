"""The fused training kernels of small float32 models (`rollout/train_ops.py`, `train_kernels.c`): RMSNorm and
SiLU(gate) * up forward and backward by hand-worked numbers, the same outputs and gradients as the HF modules they
replace, and switched in only where they apply."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_rlhf.rollout import cpu_kernels as K
from lightning_rlhf.rollout import decode_step, train_ops

needs_kernels = pytest.mark.skipif(K.kernels() is None, reason="no C compiler: the fused kernels cannot be built")


@needs_kernels
def test_rms_norm_forward_and_backward_by_hand():
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = train_ops._RMSNorm.apply(x, w, 0.0)
    # rstd = 1 / sqrt((9 + 16) / 2) = 1 / sqrt(12.5) = 0.2828427; h = x * rstd = [0.8485281, 1.1313708]
    # y = w * h = [0.8485281, 2.2627417]
    assert torch.allclose(y, torch.tensor([[0.8485281, 2.2627417]]), atol=1e-6)
    y.sum().backward()  # g = [1, 1]
    # g w = [1, 2]; mean(g w h) = (0.8485281 + 2.2627417) / 2 = 1.5556349
    # dx = rstd * (g w - h * 1.5556349) = 0.2828427 * ([1 - 1.32], [2 - 1.76]) = [-0.0905097, 0.0678823]
    # dw = g h = [0.8485281, 1.1313708]
    assert torch.allclose(x.grad, torch.tensor([[-0.0905097, 0.0678823]]), atol=1e-6)
    assert torch.allclose(w.grad, torch.tensor([0.8485281, 1.1313708]), atol=1e-6)


@needs_kernels
def test_silu_product_forward_and_backward_by_hand():
    gate = torch.tensor([[0.0, 1.0]], requires_grad=True)
    up = torch.tensor([[3.0, 3.0]], requires_grad=True)
    out = train_ops._SiluMul.apply(gate, up)
    # silu(0) = 0; silu(1) = 1 * sigmoid(1) = 0.7310586; times up = 3: [0, 2.1931758]
    assert torch.allclose(out, torch.tensor([[0.0, 2.1931758]]), atol=1e-6)
    out.sum().backward()  # g = [1, 1]
    # dup = g * silu(gate) = [0, 0.7310586]
    # dgate = g * up * s * (1 + gate * (1 - s)): gate 0: 3 * 0.5 * 1 = 1.5; gate 1: 3 * 0.7310586 * 1.2689414 = 2.7830
    assert torch.allclose(up.grad, torch.tensor([[0.0, 0.7310586]]), atol=1e-6)
    assert torch.allclose(gate.grad, torch.tensor([[1.5, 2.7830095]]), atol=1e-5)


@needs_kernels
def test_token_logprobs_forward_and_backward_by_hand():
    # logits [0, ln 3, -inf] at T = 1: p = [1/4, 3/4, 0]; token 1: logp = ln(3/4) = -0.2876821
    # entropy = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.3465736 + 0.2157616 = 0.5623351 (the -inf entry adds 0)
    logits = torch.tensor([[[0.0, 1.0986123, float("-inf")]]], requires_grad=True)
    logp, ent = train_ops.token_logprobs(logits, torch.tensor([[1]]), 1.0, True)
    assert torch.allclose(logp, torch.tensor([[-0.2876821]]), atol=1e-6)
    assert torch.allclose(ent, torch.tensor([[0.5623351]]), atol=1e-6)
    (2.0 * logp).sum().backward()  # g = 2: dlogits = g * (onehot - p) = 2 * [-1/4, 1 - 3/4, 0] = [-0.5, 0.5, 0]
    assert torch.allclose(logits.grad, torch.tensor([[[-0.5, 0.5, 0.0]]]), atol=1e-6)
    # T = 2 halves the logits: [0, ln 3 / 2] -> p = [1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3)] = [0.3660254, 0.6339746]
    # token 0: logp = ln 0.3660254 = -1.0050525; dlogits = (1 / T) * g * (onehot - p) = 0.5 * [0.6339746, -0.6339746]
    logits.grad = None
    logp, ent = train_ops.token_logprobs(logits, torch.tensor([[0]]), 2.0, False)
    assert ent is None and torch.allclose(logp, torch.tensor([[-1.0050525]]), atol=1e-6)
    logp.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[[0.3169873, -0.3169873, 0.0]]]), atol=1e-6)


@needs_kernels
def test_token_logprobs_match_the_functional_version_and_refuse_bad_input():
    from lightning_rlhf.functional import logprobs_and_entropy

    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 1003) * 4).requires_grad_()  # 1003: not a multiple of the 8 lanes
    logits.data[0, 0, :7] = float("-inf")
    tokens, weights = torch.randint(0, 1003, (3, 5)), torch.randn(3, 5)
    want, want_ent = logprobs_and_entropy(logits, tokens, 0.7)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
    got, got_ent = train_ops.token_logprobs(logits, tokens, 0.7)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_ent, want_ent, atol=1e-5)
    assert torch.allclose(got_grad, want_grad, atol=1e-6)
    bad = logits.detach().clone()
    bad[1, 2, 3] = float("nan")  # a NaN logit is not hidden: that row's log-prob is NaN
    assert train_ops.token_logprobs(bad, tokens, 1.0)[0].isnan().nonzero().tolist() == [[1, 2]]
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1003\)"):
        train_ops.token_logprobs(logits, torch.full((3, 5), 1003), 1.0)
    assert train_ops.token_logprobs(logits.double(), tokens, 1.0) is None  # the functional version takes it


def llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, mlp_bias=True))


def qwen2() -> Qwen2ForCausalLM:  # a hidden size (72) that is not a multiple of the kernels' 8 lanes
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2))


@needs_kernels
@pytest.mark.parametrize("make", [llama, qwen2])
def test_the_fused_modules_give_the_hf_outputs_and_gradients(make):
    torch.manual_seed(0)
    plain = make()
    fused = train_ops.use_fused_training_ops(copy.deepcopy(plain))
    assert type(fused.model.norm).__name__.startswith("Fused") and type(fused.model.layers[0].mlp).__name__.startswith(
        "Fused")
    assert isinstance(fused.model.norm, type(plain.model.norm))  # a subclass: isinstance checks still hold
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(3, 250, (3, 11))
    grads = []
    for model in (plain, fused):
        out = model(ids).logits
        (out.float().logsumexp(-1) * torch.linspace(0.5, 2.0, 11)).sum().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = grads
    assert (got - want).abs().max() < 1e-5
    for name, g in want_grads.items():
        assert (got_grads[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7, name


@needs_kernels
def test_the_switch_is_made_only_where_the_kernels_apply(monkeypatch):
    torch.manual_seed(1)
    model = llama()
    assert not train_ops.pays(copy.deepcopy(model).to(torch.bfloat16))
    monkeypatch.setattr(decode_step, "SMALL_STEP_BYTES", 4 * sum(p.numel() for p in model.parameters()) - 1)
    assert not train_ops.pays(model)  # one float past the size limit
    monkeypatch.undo()
    plain = copy.deepcopy(model)
    fused = train_ops.use_fused_training_ops(model)
    assert pickle.loads(pickle.dumps(fused)).model.norm.__class__ is fused.model.norm.__class__
    ids = torch.randint(3, 250, (2, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the modules' own forward
        assert torch.equal(fused(ids).logits, plain(ids).logits)
