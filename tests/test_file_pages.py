"""release_file_pages (models/file_pages.py): a frozen model's file-backed weights leave memory and come back
unchanged; weights that are not unwritten file pages are never released."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.models.file_pages import release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def _resident_kb(model: torch.nn.Module) -> int:
    """Resident kB of the mappings that hold the model's largest weight (from /proc/self/smaps)."""
    ptr = max(model.parameters(), key=lambda p: p.numel()).data_ptr()
    rss, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and len(head.split("-")) == 2 and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= ptr < end
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return rss


@pytest.fixture()
def saved_model(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # 4.0M float32 weights: 16 MB of safetensors
    return tmp_path


def test_released_weights_come_back_unchanged_from_the_file(saved_model):
    model = load_causal_lm(saved_model).eval()
    ids = torch.randint(0, 4096, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # 4,000,000 x 4 B = 16 MB
    resident = _resident_kb(model)
    released = release_file_pages(model)
    assert released > 0.95 * weights  # all but the partial first and last page of each weight
    assert _resident_kb(model) < resident - 0.9 * weights / 1024  # the file's pages left this process's memory
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert release_file_pages(model) > 0.95 * weights  # read back as file pages, so releasable again


def test_written_or_anonymous_weights_are_never_released(saved_model, caplog):
    model = load_causal_lm(saved_model).eval()
    with torch.no_grad():
        model.lm_head.weight[100, 0] += 1.0  # one page inside the weight copied on write: anonymous now
    expected = model.lm_head.weight[100, 0].item()
    assert release_file_pages(model) == 0
    assert "stay in memory" in caplog.text
    assert model.lm_head.weight[100, 0].item() == expected  # the write survives
    in_memory = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=2))
    first = next(in_memory.parameters()).detach().clone()
    assert release_file_pages(in_memory) == 0  # anonymous memory: releasing would zero it
    assert torch.equal(next(in_memory.parameters()), first)
