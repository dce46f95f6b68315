"""DataModules: raw-row batches, seeded shuffling, optional val, config errors, and a Trainer / CLI round trip."""

import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule, collate_rows

ARITH = {"task": "arithmetic", "n": 10, "seed": 0}


def prompts(loader):
    return [p for batch in loader for p in batch["prompt"]]


def test_collate_rows_by_hand():
    rows = [{"prompt": "1+1=?", "answer": "2", "numbers": [1, 1]},
            {"prompt": "2+3=?", "answer": "5", "numbers": [2, 3]}]
    assert collate_rows(rows) == {"prompt": ["1+1=?", "2+3=?"], "answer": ["2", "5"], "numbers": [[1, 1], [2, 3]]}
    assert collate_rows([]) == {}


def test_prompt_batches_keys_sizes_and_coverage():
    dm = PromptDataModule(ARITH, batch_size=5)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["prompt"]) for b in batches] == [5, 5]  # 10 rows
    assert all(set(b) == {"prompt", "answer", "question"} for b in batches)  # extra column passes through
    assert all(isinstance(p, str) for b in batches for p in b["prompt"] + b["answer"])
    assert sorted(prompts(batches)) == sorted(dm.train_dataset["prompt"][:])  # each row exactly once
    assert dm.hparams["batch_size"] == 5 and dm.hparams["train"] == ARITH


def test_shuffling_is_seeded():
    def order(seed, shuffle=True):
        dm = PromptDataModule({**ARITH, "n": 30}, batch_size=10, seed=seed, shuffle=shuffle)
        dm.setup("fit")
        return prompts(dm.train_dataloader()), dm.train_dataset["prompt"][:]

    a, rows = order(0)
    assert a == order(0)[0]  # same seed, same order
    assert a != order(1)[0] and sorted(a) == sorted(order(1)[0])  # another seed: same rows, other order
    assert a != rows  # shuffled
    assert order(0, shuffle=False)[0] == rows  # no shuffle: file order


def test_val_loader_optional():
    dm = PromptDataModule(ARITH, batch_size=4)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    dm = PromptDataModule(ARITH, val={"task": "arithmetic", "n": 5, "split": "val"}, val_batch_size=2)
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert [len(b["prompt"]) for b in val] == [2, 2, 1]
    assert prompts(val) == dm.val_dataset["prompt"][:]  # not shuffled
    assert not set(prompts(val)) & set(dm.train_dataset["prompt"][:])


def test_setup_caches_the_loaded_rows():
    dm = PromptDataModule(ARITH)
    dm.setup("fit")
    first = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is first


def test_sft_module_keeps_answer_and_names_config_key(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"prompt": "1+1=?", "completion": "<answer>2</answer>", "answer": 2}) + "\n")
    dm = SFTDataModule({"path": str(f)}, batch_size=2)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())) == {"prompt": ["1+1=?"], "completion": ["<answer>2</answer>"],
                                                 "answer": [2]}  # answer is optional: passed through as is
    dm = SFTDataModule({"task": "arithmetic", "n": 3})
    with pytest.raises(ValueError, match=r"no 'completion' column.*data.init_args.train.columns"):
        dm.setup("fit")
    dm = SFTDataModule({"task": "arithmetic_sft", "n": 3}, val={"path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(FileNotFoundError, match=r"data.init_args.val.path: .*missing.jsonl"):
        dm.setup("fit")


def test_preference_module_batches():
    dm = PreferenceDataModule({"task": "arithmetic_pairs", "n": 6}, batch_size=4)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"prompt", "chosen", "rejected", "flaw", "answer", "question"} and len(b["chosen"]) == 4
    with pytest.raises(ValueError, match="batch_size"):
        PreferenceDataModule({"task": "arithmetic_pairs", "n": 6}, batch_size=0)


class _Recorder(pl.LightningModule):
    """Counts the rows each loop sees; a single parameter so Lightning has something to optimise."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = {"train": 0, "val": 0}

    def training_step(self, batch, batch_idx):
        self.seen["train"] += len(batch["prompt"])
        return (self.w - 1.0) ** 2

    def validation_step(self, batch, batch_idx):
        self.seen["val"] += len(batch["prompt"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("val, expect_val", [(None, 0), ({"task": "arithmetic", "n": 6, "split": "val"}, 6)])
def test_trainer_fit_with_and_without_val(tmp_path, val, expect_val):
    model = _Recorder()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=PromptDataModule(ARITH, val=val, batch_size=5, val_batch_size=4))
    assert model.seen == {"train": 10, "val": expect_val}


def test_built_from_yaml_by_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptDataModule, "data")
    cfg = parser.parse_string("data:\n  train: {task: arithmetic, n: 12, max_operand: 5}\n  batch_size: 3\n")
    init = parser.instantiate_classes(cfg)
    dm = init.data
    assert isinstance(dm, PromptDataModule) and dm.batch_size == 3 and dm.val_source is None
    dm.setup("fit")
    assert len(dm.train_dataset) == 12


def test_prompt_module_drops_the_incomplete_last_training_batch():
    # 10 prompts in batches of 4: the RL stages need equal steps, so the trailing 2 prompts are dropped
    from lightning_rlhf.data import PromptDataModule

    dm = PromptDataModule(train={"task": "arithmetic", "n": 10}, batch_size=4)
    assert [len(b["prompt"]) for b in dm.train_dataloader()] == [4, 4]
