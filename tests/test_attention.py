"""The "sdpa_gqa" attention (models/attention.py): the same numbers as transformers' sdpa, without the key/value
copies, and what loading switches to it."""

from __future__ import annotations

import copy
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.models import attention
from lightning_rlhf.models.attention import use_gqa_attention
from lightning_rlhf.models.loading import load_causal_lm


def llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads)
    return LlamaForCausalLM(cfg)


def left_padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5], mask[1, :2] = 0, 0
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def test_grouped_heads_give_sdpa_numbers_and_gradients_without_copies(monkeypatch):
    hf = llama(kv_heads=2)
    ours = use_gqa_attention(copy.deepcopy(hf))
    assert ours.config._attn_implementation == "sdpa_gqa"
    repeats = []
    import transformers.integrations.sdpa_attention as sdpa_module
    real_repeat = sdpa_module.repeat_kv
    monkeypatch.setattr(sdpa_module, "repeat_kv", lambda *a: repeats.append(1) or real_repeat(*a))
    ids, mask, pos = left_padded()
    weights = torch.randn(3, 12, 256)
    out = {}
    for name, model in (("hf", hf), ("ours", ours)):
        repeats.clear()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        (logits * weights)[mask.bool()].sum().backward()
        out[name] = (logits.detach(), len(repeats))
    assert out["hf"][1] == 4 and out["ours"][1] == 0  # transformers copies k and v in both layers; we copy none
    real = mask.bool()
    torch.testing.assert_close(out["ours"][0][real], out["hf"][0][real], atol=1e-6, rtol=0)
    for a, b in zip(ours.parameters(), hf.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_ungrouped_heads_and_unmasked_calls_go_to_sdpa(monkeypatch):
    calls, real_sdpa = [], attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    ids, mask, pos = left_padded()
    for kv_heads in (4, 2):  # 4: every query head has its own key/value head
        model = use_gqa_attention(llama(kv_heads))
        calls.clear()
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
        assert len(calls) == (2 if kv_heads == 4 else 0)
        calls.clear()
        model(input_ids=ids)  # no padding: transformers passes no mask, and uses enable_gqa itself
        assert len(calls) == 2


def test_loading_switches_to_it_and_saving_does_not_record_it(tmp_path):
    llama(kv_heads=2).save_pretrained(tmp_path / "m")
    model = load_causal_lm(tmp_path / "m")
    assert model.config._attn_implementation == "sdpa_gqa"
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "sdpa_gqa" not in json.dumps(saved)
