"""ReloadableWeights (models/reloadable.py): a frozen model's weights leave memory and come back from its
safetensors checkpoint unchanged; weights that differ from the file, or that it lacks, are never released."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.models.reloadable import ReloadableWeights, safetensors_entries

CONFIG = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
# embeddings and head 2 x 4096 x 256 = 2,097,152; per layer q 65,536 + k 32,768 + v 32,768 + o 65,536 + mlp
# 3 x 262,144 + norms 512 = 983,552, two layers 1,967,104; final norm 256: 4,064,512 weights, 16,258,048 B fp32
N_WEIGHTS = 4_064_512


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.fixture()
def saved_model(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(CONFIG).save_pretrained(tmp_path)
    return tmp_path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_released_weights_come_back_unchanged_from_the_file(saved_model):
    model = load_causal_lm(saved_model).eval()
    assert sum(p.numel() for p in model.parameters()) == N_WEIGHTS
    ids = torch.randint(0, 4096, (2, 12))
    before = _logits(model, ids)
    weights = ReloadableWeights(model, saved_model)
    rss = _rss_mb()
    assert weights.release() == 4 * N_WEIGHTS
    assert all(p.numel() == 0 for p in model.parameters())
    assert _rss_mb() < rss - 12  # of the 15.5 MB of weights
    with weights.resident():
        assert torch.equal(_logits(model, ids), before)
    assert all(p.numel() == 0 for p in model.parameters())  # released again after the block
    weights.restore()
    assert torch.equal(_logits(model, ids), before)


def test_shards_and_a_dtype_other_than_the_files(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(CONFIG).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="4MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(set(e.path for e in safetensors_entries(tmp_path).values())) > 1
    model = load_causal_lm(tmp_path, dtype="float32").eval()  # bf16 on disk, fp32 in memory
    ids = torch.randint(0, 4096, (2, 12))
    before = _logits(model, ids)
    weights = ReloadableWeights(model, tmp_path)
    assert weights.release() == 4 * N_WEIGHTS  # the fp32 copies
    weights.restore()
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(_logits(model, ids), before)


def test_weights_that_differ_from_the_file_or_are_not_in_it_stay(saved_model, tmp_path, caplog):
    model = load_causal_lm(saved_model).eval()
    with torch.no_grad():
        model.lm_head.weight[100, 0] += 1.0  # changed after loading: the file no longer holds it
    expected = model.lm_head.weight[100, 0].item()
    weights = ReloadableWeights(model, saved_model)
    assert weights.release() == 0 and weights.release() == 0
    assert "'lm_head.weight' differs from its copy" in caplog.text and caplog.text.count("stay in memory") == 1
    assert model.lm_head.weight[100, 0].item() == expected
    with weights.resident():  # a no-op
        assert model.lm_head.weight[100, 0].item() == expected
    in_memory = LlamaForCausalLM(CONFIG)
    first = next(in_memory.parameters()).detach().clone()
    assert ReloadableWeights(in_memory, tmp_path / "nowhere").release() == 0
    assert "is not a local directory with model.safetensors" in caplog.text
    assert torch.equal(next(in_memory.parameters()), first)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    assert ReloadableWeights(other, saved_model).release() == 0  # its third layer is not in the file
    assert "'model.layers.2." in caplog.text


def test_a_checkpoint_changed_during_the_run_is_an_error_not_a_silent_other_reference(saved_model):
    model = load_causal_lm(saved_model).eval()
    weights = ReloadableWeights(model, saved_model)
    assert weights.release() > 0
    LlamaForCausalLM(CONFIG).save_pretrained(saved_model)  # another model written over the reference's files
    with pytest.raises(RuntimeError, match="changed since the reference was loaded"):
        weights.restore()


def test_the_rl_stages_release_a_reference_by_default_only_on_a_cpu_and_where_it_is_large(saved_model, monkeypatch):
    from lightning_rlhf.models import reloadable

    model = load_causal_lm(saved_model)
    assert reloadable.AUTO_RELEASE_BYTES == 64 * 2**20
    assert not reloadable.releases_by_default(model)  # 16,258,048 B of weights < 67,108,864
    monkeypatch.setattr(reloadable, "AUTO_RELEASE_BYTES", 4 * N_WEIGHTS)
    assert reloadable.releases_by_default(model)  # exactly at the bound
    monkeypatch.setattr(reloadable, "AUTO_RELEASE_BYTES", 4 * N_WEIGHTS + 1)
    assert not reloadable.releases_by_default(model)
    monkeypatch.setattr(reloadable, "AUTO_RELEASE_BYTES", 0)
    assert not reloadable.releases_by_default(model.to("meta"))  # not on a CPU: device memory is not ours to free


def test_a_release_nobody_asked_for_says_why_it_cannot_be_done_quietly(saved_model, tmp_path, caplog):
    model = load_causal_lm(saved_model)
    caplog.set_level("INFO")
    assert ReloadableWeights(model, tmp_path / "nowhere", warn=False).release() == 0
    quiet = [r for r in caplog.records if "stay in memory" in r.getMessage()]
    assert [r.levelname for r in quiet] == ["INFO"]
    caplog.clear()
    assert ReloadableWeights(model, tmp_path / "nowhere").release() == 0
    assert [r.levelname for r in caplog.records if "stay in memory" in r.getMessage()] == ["WARNING"]


def test_an_unasked_release_is_planned_only_from_safetensors_files(saved_model, tmp_path, monkeypatch):
    from lightning_rlhf.models import reloadable
    from lightning_rlhf.models.reloadable import ReleasedReference

    monkeypatch.setattr(reloadable, "AUTO_RELEASE_BYTES", 1)
    model = load_causal_lm(saved_model)
    assert ReleasedReference(None, saved_model).releases(model)
    assert not ReleasedReference(None, tmp_path / "nowhere").releases(model)  # a hub id, or a GGUF file's dir
    (tmp_path / "gguf").mkdir()
    assert not ReleasedReference(None, tmp_path / "gguf").releases(model)
    assert ReleasedReference(True, tmp_path / "gguf").releases(model)  # asked: its first release says why not
    assert not ReleasedReference(False, saved_model).releases(model) and not ReleasedReference(True, saved_model).releases(None)
