"""oneDNN float32 linears (models/cpu_linear.py): the same math as F.linear, used only where chosen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_rlhf.models import cpu_linear
from lightning_rlhf.models.cpu_linear import (
    OneDNNLinear,
    PackedLinear,
    onednn_available,
    onednn_linear,
    onednn_pays,
    packing_pays,
    use_onednn_linear,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@needs_onednn
def test_hand_worked_forward_and_gradients():
    # y = x W^T + b with x = [1, 2], W = [[3, 4], [5, 6]], b = [0.5, -0.5]:
    #   y = [1*3 + 2*4 + 0.5, 1*5 + 2*6 - 0.5] = [11.5, 16.5]
    # upstream gradient g = [1, 2]:
    #   dx = g W = [1*3 + 2*5, 1*4 + 2*6] = [13, 16];  dW = g^T x = [[1, 2], [2, 4]];  db = g = [1, 2]
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    w = torch.tensor([[3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    b = torch.tensor([0.5, -0.5], requires_grad=True)
    y = cpu_linear._OneDNNLinearFunction.apply(x, w, b)
    y.backward(torch.tensor([[1.0, 2.0]]))
    assert y.tolist() == [[11.5, 16.5]]
    assert x.grad.tolist() == [[13.0, 16.0]]
    assert w.grad.tolist() == [[1.0, 2.0], [2.0, 4.0]]
    assert b.grad.tolist() == [1.0, 2.0]


@needs_onednn
def test_large_enough_float32_calls_go_to_onednn_and_match_float64(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 40, 96, requires_grad=True)  # 120 rows x 96 x 256 = 2.9M multiply-adds >= MIN_WORK
    w = torch.randn(256, 96, requires_grad=True)
    b = torch.randn(256, requires_grad=True)
    g = torch.randn(3, 40, 256)
    monkeypatch.setattr(cpu_linear.F, "linear", lambda *a, **k: pytest.fail("F.linear was called"))
    y = onednn_linear(x, w, b)
    y.backward(g)
    monkeypatch.undo()
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y_ref = F.linear(*ref)
    y_ref.backward(g.double())
    for ours, exact in [(y, y_ref), (x.grad, ref[0].grad), (w.grad, ref[1].grad), (b.grad, ref[2].grad)]:
        assert ours.shape == exact.shape
        torch.testing.assert_close(ours.double(), exact.detach(), rtol=0, atol=1e-5 * float(exact.detach().abs().max()))


@pytest.mark.parametrize("case", ["small", "bfloat16", "autocast"])
def test_other_calls_go_to_f_linear(monkeypatch, case):
    calls = []
    real = F.linear
    monkeypatch.setattr(cpu_linear.F, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = 2 if case == "small" else 200
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    x, w = torch.randn(rows, 64, dtype=dtype), torch.randn(256, 64, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = onednn_linear(x, w)
    assert calls == [1]
    assert y.dtype == (torch.float32 if case == "small" else torch.bfloat16)


@needs_onednn
def test_use_onednn_linear_keeps_parameters_outputs_and_saved_files(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plain = LlamaForCausalLM(config)
    fast = LlamaForCausalLM(config)
    fast.load_state_dict(plain.state_dict())
    assert use_onednn_linear(fast, force=True) is fast
    kinds = {type(m) for m in fast.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {OneDNNLinear}
    assert list(fast.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 128, (4, 40))
    out_fast, out_plain = fast(ids).logits, plain(ids).logits
    out_fast.sum().backward()
    out_plain.sum().backward()
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    q_fast = fast.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(q_fast, plain.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-5)
    fast.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.model.layers[0].mlp.up_proj) is torch.nn.Linear
    untouched = use_onednn_linear(LlamaForCausalLM(config), force=False)
    assert all(type(m) is torch.nn.Linear for m in untouched.modules() if isinstance(m, torch.nn.Linear))


def test_the_environment_variable_decides_and_a_bad_value_is_named(monkeypatch):
    onednn_pays.cache_clear()
    try:
        monkeypatch.setenv("LIGHTNING_RLHF_ONEDNN", "0")
        assert onednn_pays() is False
        onednn_pays.cache_clear()
        monkeypatch.setenv("LIGHTNING_RLHF_ONEDNN", "yes")
        with pytest.raises(ValueError, match="LIGHTNING_RLHF_ONEDNN='yes'.*0.*1"):
            onednn_pays()
    finally:
        onednn_pays.cache_clear()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_f_linear_outputs(monkeypatch, dtype):
    if not onednn_available(dtype):
        pytest.skip(f"oneDNN has no {dtype} linear on this CPU (needs AVX-512 or AVX-NE-CONVERT)")
    monkeypatch.setattr(cpu_linear, "packing_pays", lambda *shape: True)
    torch.manual_seed(0)
    w, b, x = torch.randn(512, 192).to(dtype), torch.randn(512).to(dtype), torch.randn(64, 1, 192).to(dtype)
    packed = PackedLinear(w, b, rows=64)
    assert packed.packed  # 64 x 192 x 512 = 6.3M >= MIN_WORK
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=tol, atol=tol * float(F.linear(x, w, b).abs().max()))
    small = PackedLinear(w, b, rows=1)  # 1 x 192 x 512 < MIN_WORK: the weight as given
    assert not small.packed and small.weight is w


def test_a_dtype_onednn_cannot_run_here_keeps_the_weight_as_given(monkeypatch):
    # An AVX2-only AMD EPYC has no oneDNN bfloat16 linear ("could not create a primitive descriptor"): the
    # sampler's projections must then stay on F.linear instead of failing at the first decode step.
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda dtype=torch.float32: dtype == torch.float32)
    torch.manual_seed(0)
    w, x = torch.randn(512, 192).bfloat16(), torch.randn(64, 1, 192).bfloat16()
    packed = PackedLinear(w, None, rows=64)  # 64 x 192 x 512 = 6.3M >= MIN_WORK, but bf16 is refused
    assert not packed.packed and packed.weight is w
    assert torch.equal(packed(x), F.linear(x, w))


def test_the_availability_probe_answers_per_dtype():
    # float32 is every oneDNN build's; bfloat16 depends on the CPU, but the answer must be a bool, cached, and
    # agree with a real call
    assert onednn_available(torch.float32) is onednn_available() is True or not torch.backends.mkldnn.is_available()
    bf16 = onednn_available(torch.bfloat16)
    a = torch.ones(2, 4, dtype=torch.bfloat16)
    try:
        cpu_linear.onednn_mm(a, a)
        runs = True
    except RuntimeError:
        runs = False
    assert bf16 is runs


@needs_onednn
@pytest.mark.parametrize("packed_s, plain_s, expected", [(1.0, 1.1, True), (1.0, 1.02, False), (2.0, 1.0, False)])
def test_float32_packing_follows_the_timing_of_its_own_shape(monkeypatch, packed_s, plain_s, expected):
    # packing_pays times the packed call first, then F.linear, and packs when F.linear takes >= PACK_MARGIN
    # (1.05) x as long: 1.1 / 1.0 = 1.1 >= 1.05 -> pack; 1.02 / 1.0 < 1.05 -> keep; 1.0 / 2.0 -> keep
    monkeypatch.delenv("LIGHTNING_RLHF_ONEDNN", raising=False)
    times = iter([packed_s, plain_s])
    monkeypatch.setattr(cpu_linear, "_seconds", lambda fn, repeats=20: next(times))
    packing_pays.cache_clear()
    try:
        w = torch.randn(512, 192)
        packed = PackedLinear(w, None, rows=64)  # 64 x 192 x 512 = 6.3M >= MIN_WORK: the probe decides
        assert packed.packed is expected
        assert PackedLinear.pays(w, 64) is expected  # cached per shape: no second timing (the iterator is empty)
    finally:
        packing_pays.cache_clear()


def test_the_environment_variable_decides_float32_packing(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_seconds", lambda fn, repeats=20: pytest.fail("timed despite the variable"))
    packing_pays.cache_clear()
    try:
        monkeypatch.setenv("LIGHTNING_RLHF_ONEDNN", "0")
        assert PackedLinear.pays(torch.randn(512, 192), 64) is False
        packing_pays.cache_clear()
        monkeypatch.setenv("LIGHTNING_RLHF_ONEDNN", "1")
        assert PackedLinear.pays(torch.randn(512, 192), 64) is onednn_available()
    finally:
        packing_pays.cache_clear()


@needs_onednn
def test_large_float32_sampler_weights_are_packed_without_a_probe(monkeypatch):
    # ALWAYS_PACK_BYTES = 1 MiB: 512 x 512 float32 = 4 * 262144 = 1048576 B, at the bound -> packed untimed;
    # 511 x 512 = 1046528 B, below -> the probe decides (here: timed as no faster -> not packed)
    monkeypatch.delenv("LIGHTNING_RLHF_ONEDNN", raising=False)
    timed = []
    monkeypatch.setattr(cpu_linear, "_seconds", lambda fn, repeats=20: timed.append(1) or 1.0)
    packing_pays.cache_clear()
    try:
        assert PackedLinear.pays(torch.randn(512, 512), 64) is True and not timed
        assert PackedLinear.pays(torch.randn(511, 512), 64) is False and len(timed) == 2
        monkeypatch.setenv("LIGHTNING_RLHF_ONEDNN", "0")  # the variable still says no
        assert PackedLinear.pays(torch.randn(512, 512), 64) is False
    finally:
        packing_pays.cache_clear()
