"""load_rows: task / local file / directory / hub sources, renames, formatters, and every error message."""

import json

import datasets
import pytest

from lightning_rlhf.data.sources import FORMATTERS, load_rows
from lightning_rlhf.data.tasks import arithmetic_problems

PA = ["prompt", "answer"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------- task sources


def test_task_source_equals_generator_and_passes_kwargs():
    ds = load_rows({"task": "arithmetic", "n": 20, "seed": 1, "max_operand": 5}, PA)
    assert ds.to_list() == arithmetic_problems(20, seed=1, max_operand=5)
    ds = load_rows({"task": "arithmetic_sft", "n": 7, "limit": 3}, ["prompt", "completion"])
    assert len(ds) == 3 and set(ds.column_names) == {"prompt", "completion", "answer", "question", "style"}


def test_task_source_errors():
    with pytest.raises(ValueError, match=r"data.task: unknown task 'arith'.*arithmetic, arithmetic_pairs"):
        load_rows({"task": "arith", "n": 5}, PA)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_operands'\].*max_operand"):
        load_rows({"task": "arithmetic", "n": 5, "max_operands": 3}, PA)
    with pytest.raises(ValueError, match="need n"):
        load_rows({"task": "arithmetic"}, PA)
    # the arithmetic prompts have no completion: the message names it, what is there, and the fix
    with pytest.raises(ValueError, match=r"task 'arithmetic' has no 'completion' column.*it has: prompt, answer, "
                                         r"question.*my.train.columns"):
        load_rows({"task": "arithmetic", "n": 5}, ["prompt", "completion"], what="my.train")


def test_source_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"needs 'task'.*\{task: arithmetic, n: 2000\}"):
        load_rows({"n": 5}, PA)
    with pytest.raises(ValueError, match="both 'task' and 'path'"):
        load_rows({"task": "arithmetic", "path": "x.jsonl"}, PA)
    with pytest.raises(ValueError, match="must be a mapping"):
        load_rows("data/train.jsonl", PA)
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1"}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colums'\].*columns"):
        load_rows({"path": str(f), "colums": {"prompt": "q"}}, PA)
    with pytest.raises(ValueError, match="limit must be a non-negative integer"):
        load_rows({"path": str(f), "limit": "3"}, PA)
    with pytest.raises(ValueError, match=r"data.format: unknown format 'gsm9k'.*gsm8k, identity"):
        load_rows({"path": str(f), "format": "gsm9k"}, PA)


def test_missing_local_path_is_file_not_found(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows({"path": str(missing)}, PA)
    with pytest.raises(FileNotFoundError, match="data/train.jsonl"):  # relative, with a suffix: never the hub
        load_rows({"path": "data/train.jsonl"}, PA)


# ---------------------------------------------------------------------------------------- JSONL validation


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"},
                                               '{"prompt": "c", "answer": ', {"prompt": "d", "answer": "4"}])
    with pytest.raises(ValueError, match=rf"{f}:3: malformed JSON row .*Fix or delete that line"):
        load_rows({"path": str(f)}, PA)
    # limit 2 stops before the bad line
    assert load_rows({"path": str(f), "limit": 2}, PA)["prompt"][:] == ["a", "b"]


def test_jsonl_row_missing_column_names_file_line_and_fix(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "answer": "1"}, "",  # blank line 2 is skipped
                                              {"prompt": "b", "solution": "2"}])
    with pytest.raises(ValueError, match=rf"{f}:3: row has no 'answer' column \(it has: prompt, solution\)\. "
                                         r"Add it, or map another column with data.init_args.train.columns"):
        load_rows({"path": str(f)}, PA, what="data.init_args.train")


def test_jsonl_values_null_empty_wrong_type_and_numbers(tmp_path):
    f = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}])
    with pytest.raises(ValueError, match=rf"{f}:2: 'prompt' is null"):
        load_rows({"path": str(f)}, PA)
    f = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "  ", "answer": "1"}])
    with pytest.raises(ValueError, match=rf"{f}:1: 'prompt' is empty"):
        load_rows({"path": str(f)}, PA)
    f = write_jsonl(tmp_path / "l.jsonl", [{"prompt": ["a"], "answer": "1"}])
    with pytest.raises(ValueError, match=rf"{f}:1: 'prompt' is a list.*expected text"):
        load_rows({"path": str(f)}, PA)
    f = write_jsonl(tmp_path / "x.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=rf"{f}:1: expected a JSON object"):
        load_rows({"path": str(f)}, PA)
    f = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": 16, "id": 7}, {"prompt": "b", "answer": 2.5,
                                                                                     "id": 8}])
    ds = load_rows({"path": str(f)}, PA)
    assert ds.to_list() == [{"prompt": "a", "answer": "16", "id": 7}, {"prompt": "b", "answer": "2.5", "id": 8}]


def test_columns_rename_on_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=?", "solution": 2, "prompt": "old"}])
    ds = load_rows({"path": str(f), "columns": {"prompt": "question", "answer": "solution"}}, PA)
    assert ds.to_list() == [{"prompt": "1+1=?", "answer": "2"}]  # the old 'prompt' is replaced
    with pytest.raises(ValueError, match=rf"{f}:1: row has no 'query' column"):
        load_rows({"path": str(f), "columns": {"prompt": "query"}}, PA)
    with pytest.raises(ValueError, match="columns must map"):
        load_rows({"path": str(f), "columns": ["question"]}, PA)


# ---------------------------------------------------------------------------------------- formatters


GSM8K_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A farm has 1,000 hens and 72 more ducks than hens. How many birds?",
     "answer": "Ducks: 1,000+72 = 1,072. Birds: 1,000+1,072 = 2,072\n#### 2,072"},
]


def test_gsm8k_formatter_on_local_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    ds = load_rows({"path": str(f), "format": "gsm8k"}, PA)
    assert ds["answer"][:] == ["72", "2072"]  # text after '####', comma dropped
    assert ds["prompt"][0] == GSM8K_ROWS[0]["question"]
    assert ds["solution"][1] == GSM8K_ROWS[1]["answer"] and "question" not in ds.column_names
    bad = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], {"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=rf"{bad}:2: format 'gsm8k' failed.*'####"):
        load_rows({"path": str(bad), "format": "gsm8k"}, PA)


def test_identity_formatter_is_registered():
    assert FORMATTERS.get("identity")({"a": 1}) == {"a": 1}


# ---------------------------------------------------------------------------------------- other file kinds


def test_parquet_csv_json_and_dataset_level_errors(tmp_path):
    datasets.Dataset.from_list([{"q": "1+2=?", "a": 3}, {"q": "2+2=?", "a": 4}]).to_parquet(str(tmp_path / "d.parquet"))
    ds = load_rows({"path": str(tmp_path / "d.parquet"), "columns": {"prompt": "q", "answer": "a"}}, PA)
    assert ds.to_list() == [{"prompt": "1+2=?", "answer": "3"}, {"prompt": "2+2=?", "answer": "4"}]
    with pytest.raises(ValueError, match=r"d.parquet' has no 'prompt' column \(needed: prompt, answer; it has: q, a\)"
                                         r".*data.columns, e.g. columns: \{prompt: <their column>\}"):
        load_rows({"path": str(tmp_path / "d.parquet")}, PA)
    with pytest.raises(ValueError, match=r"has no column 'question' \(named in data.columns for 'prompt'\)"):
        load_rows({"path": str(tmp_path / "d.parquet"), "columns": {"prompt": "question"}}, PA)

    (tmp_path / "d.csv").write_text("prompt,answer\n1+2=?,3\n,4\n")
    with pytest.raises(ValueError, match=r"d.csv' row 1: 'prompt' is null"):
        load_rows({"path": str(tmp_path / "d.csv")}, PA)
    assert load_rows({"path": str(tmp_path / "d.csv"), "limit": 1}, PA).to_list() == [{"prompt": "1+2=?",
                                                                                      "answer": "3"}]
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "p", "answer": 1}]))
    assert load_rows({"path": str(tmp_path / "d.json")}, PA).to_list() == [{"prompt": "p", "answer": "1"}]


def test_directory_splits_and_save_to_disk(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": "t1", "answer": "1"}, {"prompt": "t2", "answer": "2"}])
    write_jsonl(d / "test.jsonl", [{"prompt": "x", "answer": "3"}])
    assert load_rows({"path": str(d)}, PA)["prompt"][:] == ["t1", "t2"]  # split defaults to train
    assert load_rows({"path": str(d), "split": "test"}, PA)["prompt"][:] == ["x"]
    with pytest.raises(ValueError, match=r"no files for split 'validation'.*test, train"):
        load_rows({"path": str(d), "split": "validation"}, PA)

    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", [{"prompt": "a", "answer": "1"}])
    write_jsonl(plain / "b.jsonl", [{"prompt": "b", "answer": "2"}])
    assert load_rows({"path": str(plain)}, PA)["prompt"][:] == ["a", "b"]  # no split names: all files
    assert load_rows({"path": str(plain), "limit": 1}, PA)["prompt"][:] == ["a"]

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "s", "answer": 5}])}).save_to_disk(str(saved))
    assert load_rows({"path": str(saved)}, PA).to_list() == [{"prompt": "s", "answer": "5"}]


# ---------------------------------------------------------------------------------------- hub ids


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(GSM8K_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_rows({"path": "openai/gsm8k", "name": "main", "split": "train", "format": "gsm8k", "limit": 1}, PA)
    assert calls == [("openai/gsm8k", {"split": "train", "name": "main"})]
    assert ds.to_list()[0]["answer"] == "72"


def test_hub_failure_is_explained(monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"could not load Hugging Face dataset 'someone/thing'.*no network"):
        load_rows({"path": "someone/thing"}, PA)
