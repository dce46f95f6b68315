"""Load rows from a YAML `source` into a validated `datasets.Dataset`: generated task, local file(s), or HF id.

    {task: arithmetic, n: 2000, seed: 0, split: train}          # a generator from TASKS (+ its kwargs)
    {path: data/train.jsonl}                                    # .jsonl/.json/.parquet/.csv file or a directory
    {path: openai/gsm8k, name: main, split: train, format: gsm8k}  # any Hugging Face dataset id

Every source may add `columns: {prompt: question}` (our name -> their column), `limit: N` (first N rows)
and `format: gsm8k` (a row transform from FORMATTERS). Order: read -> rename -> format -> validate.

Validation names the thing and the fix: JSONL rows are read here line by line, so errors say
`file:line`; a missing required column lists the columns present and the `columns:` fix; numbers in
text columns become strings; a null or empty text value is an error. Simplifications: JSON/JSONL are
parsed here (not by `datasets`), so they are loaded fully into memory; in a local directory, files
whose names start with train/validation/val/test/dev pick the split, other names all count as one split
(and a single local file ignores `split`).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import datasets

from lightning_rlhf.data.registry import FORMATTERS, TASKS
from lightning_rlhf.errors import DataError, MissingFileError

COMMON_KEYS = ("columns", "limit", "format")
PATH_KEYS = ("path", "name", "split", "data_files", "revision")
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                "dev": "validation", "test": "test"}
EXAMPLE = "{task: arithmetic, n: 2000} or {path: data/train.jsonl} or {path: openai/gsm8k, name: main, split: train}"


@FORMATTERS.register("identity")
def identity(row: dict) -> dict:
    """Leave the row as it is."""
    return row


@FORMATTERS.register("gsm8k")
def gsm8k(row: dict) -> dict:
    """GSM8K: `question` -> prompt; the number after '####' in `answer` (commas dropped) -> answer.

    The full worked answer is kept as `solution`.
    """
    text = row.get("answer")
    if not isinstance(text, str) or "####" not in text:
        raise DataError(f"format gsm8k: the 'answer' value has no '#### <number>' line (got {text!r:.80}). "
                         "Use format: identity, or point 'answer' at a GSM8K-style column with columns:.")
    out = dict(row)
    if "prompt" not in out and "question" in out:
        out["prompt"] = out.pop("question")
    out["solution"] = text
    out["answer"] = text.rsplit("####", 1)[1].strip().replace(",", "")
    return out


# ----------------------------------------------------------------------------------------------
# the spec: what to read and what to do with it


class _Spec:
    """A checked source dict plus the helpers that report errors against it."""

    def __init__(self, source: Any, required: Sequence[str], what: str) -> None:
        if not isinstance(source, Mapping):
            raise DataError(f"{what} must be a mapping such as {EXAMPLE}; got {type(source).__name__} {source!r:.80}")
        self.source, self.required, self.what = dict(source), list(required), what
        if "task" in source and "path" in source:
            raise DataError(f"{what} has both 'task' and 'path'; give one: {EXAMPLE}")
        if "task" not in source and "path" not in source:
            raise DataError(f"{what} needs 'task' (generated data) or 'path' (a file, a directory or a Hugging "
                             f"Face dataset id), e.g. {EXAMPLE}. Got keys: {sorted(source)}")
        self.columns = self._check_columns(source.get("columns"))
        self.limit = source.get("limit")
        if self.limit is not None and (not isinstance(self.limit, int) or isinstance(self.limit, bool)
                                       or self.limit < 0):
            raise DataError(f"{what}.limit must be a non-negative integer, got {self.limit!r}")
        fmt = source.get("format")
        try:
            self.format: Callable[[dict], dict] | None = FORMATTERS.get(fmt) if fmt else None
        except ValueError as e:
            raise DataError(f"{what}.format: {e}") from None
        self.format_name = fmt
        if "path" in source:
            self._check_keys(PATH_KEYS + COMMON_KEYS)

    def _check_keys(self, valid: Sequence[str]) -> None:
        unknown = sorted(set(self.source) - set(valid))
        if unknown:
            raise DataError(f"{self.what}: unknown key(s) {unknown}. Valid keys here: {', '.join(valid)}")

    def _check_columns(self, columns: Any) -> dict[str, str]:
        if columns is None:
            return {}
        if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in columns.items()):
            raise DataError(f"{self.what}.columns must map our column names to theirs, e.g. "
                             f"{{prompt: question, answer: solution}}; got {columns!r}")
        theirs = list(columns.values())
        if len(set(theirs)) != len(theirs):
            raise DataError(f"{self.what}.columns maps one column to several names ({columns}); map each once.")
        return dict(columns)

    def describe(self) -> str:
        if "task" in self.source:
            return f"task '{self.source['task']}'"
        split = f" (split {self.source['split']})" if "split" in self.source else ""
        return f"'{self.source['path']}'{split}"

    def missing_row_column(self, loc: str, col: str, row: dict, ours: str | None = None) -> DataError:
        """The row-level message; `ours` is set when `col` is their column named in `columns:`."""
        mapped = f", which {self.what}.columns maps to '{ours}'" if ours else ""
        return DataError(f"{loc}: row has no '{col}' column{mapped} (it has: {', '.join(row) or 'nothing'}). Add it, "
                          f"or map another column with {self.what}.columns, e.g. columns: {{{ours or col}: "
                          "<their column>}.")


# ----------------------------------------------------------------------------------------------
# row-level processing (JSON / JSONL): rename -> format -> validate, errors at file:line


def _text_value(value: Any, col: str, loc: str) -> str:
    """A required text column's value as a non-empty str (numbers are converted)."""
    if isinstance(value, float) and math.isnan(value):
        value = None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif isinstance(value, float):
        value = str(int(value)) if value.is_integer() else str(value)
    if value is None:
        raise DataError(f"{loc}: '{col}' is null. Every row needs a {col}; fill it in or delete that row.")
    if not isinstance(value, str):
        raise DataError(f"{loc}: '{col}' is a {type(value).__name__} ({value!r:.60}), expected text. Point "
                         f"'{col}' at a text column with columns:, or convert it with format:.")
    if not value.strip():
        raise DataError(f"{loc}: '{col}' is empty. Every row needs a non-empty {col}; fill it in or delete that row.")
    return value


def _process_row(row: Any, loc: str, spec: _Spec) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{loc}: expected a JSON object per row, got {type(row).__name__}. Write one "
                         '{"prompt": ..., ...} object per line.')
    for ours, theirs in spec.columns.items():
        if theirs not in row:
            raise spec.missing_row_column(loc, theirs, row, ours)
    moved = set(spec.columns) | set(spec.columns.values())
    renamed = {k: v for k, v in row.items() if k not in moved}
    renamed.update({ours: row[theirs] for ours, theirs in spec.columns.items()})
    if spec.format is not None:
        try:
            renamed = spec.format(renamed)
        except Exception as e:
            raise DataError(f"{loc}: format '{spec.format_name}' failed: {e}") from e
    for col in spec.required:
        if col not in renamed:
            raise spec.missing_row_column(loc, col, renamed)
        renamed[col] = _text_value(renamed[col], col, loc)
    return renamed


def _loads(text: str, message: Callable[[json.JSONDecodeError], str]) -> Any:
    """`json.loads(text)`; malformed JSON raises a DataError with `message(error)` (no chained traceback)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(message(err)) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", _loads(line, lambda err: f"{path}:{lineno}: malformed JSON row ({err.msg} "
                                                 f"at column {err.colno}). Fix or delete that line.")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):  # HF also reads JSON Lines from .json files
        yield from _jsonl_rows(path)
        return
    rows = _loads(text, lambda err: f"{path}:{err.lineno}: malformed JSON ({err}). Fix the file, or write JSON "
                                    "Lines (.jsonl, one object per line).")
    for i, row in enumerate(rows):
        yield f"{path}: row {i}", row


def _rows_to_dataset(rows: list[dict], where: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as e:  # pyarrow type errors: one column with different types across rows
        raise DataError(f"{where}: could not build a table from the rows ({e}). Each column must hold one "
                         "type in every row; fix the odd rows or drop that column.") from e


def _load_json_file(path: Path, kind: str, spec: _Spec, limit: int | None) -> datasets.Dataset:
    rows: list[dict] = []
    if limit == 0:
        return _rows_to_dataset(rows, str(path))
    for loc, row in (_jsonl_rows(path) if kind == "jsonl" else _json_rows(path)):
        rows.append(_process_row(row, loc, spec))
        if limit is not None and len(rows) >= limit:
            break
    return _rows_to_dataset(rows, str(path))


# ----------------------------------------------------------------------------------------------
# dataset-level processing (parquet, csv, hub, generated): errors by row index


def _process_dataset(ds: datasets.Dataset, spec: _Spec, limit: int | None) -> datasets.Dataset:
    where = spec.describe()
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    for ours, theirs in spec.columns.items():
        if theirs not in ds.column_names:
            raise DataError(f"{where} has no column '{theirs}' (named in {spec.what}.columns for '{ours}'). Its "
                             f"columns: {', '.join(ds.column_names)}. Fix the mapping.")
    if spec.columns:
        clash = [c for c in spec.columns if c in ds.column_names and c not in spec.columns.values()]
        ds = ds.remove_columns(clash).rename_columns({theirs: ours for ours, theirs in spec.columns.items()})
    if spec.format is not None:
        ds = _format_dataset(ds, spec)
    missing = [c for c in spec.required if c not in ds.column_names]
    if missing:
        col = missing[0]
        raise DataError(f"{where} has no '{col}' column (needed: {', '.join(spec.required)}; it has: "
                         f"{', '.join(ds.column_names)}). Map one of its columns with {spec.what}.columns, "
                         f"e.g. columns: {{{col}: <their column>}}, or pick a source that has it.")
    for col in spec.required:
        values = list(ds[col])
        fixed = [_text_value(v, col, f"{where} row {i}") for i, v in enumerate(values)]
        if fixed != values or ds.features[col] != datasets.Value("string"):
            ds = ds.remove_columns(col).add_column(col, fixed)
    return ds


def _format_dataset(ds: datasets.Dataset, spec: _Spec) -> datasets.Dataset:
    def apply(row: dict, i: int) -> dict:
        try:
            return spec.format(dict(row))
        except Exception as e:
            raise DataError(f"{spec.describe()} row {i}: format '{spec.format_name}' failed: {e}") from e

    return ds.map(apply, with_indices=True, remove_columns=ds.column_names, desc=f"format {spec.format_name}")


def _from_task(spec: _Spec) -> datasets.Dataset:
    args = {k: v for k, v in spec.source.items() if k not in ("task",) + COMMON_KEYS}
    try:
        fn = TASKS.get(spec.source["task"])
    except ValueError as e:
        raise DataError(f"{spec.what}.task: {e}") from None
    if "n" not in args:
        raise DataError(f"{spec.what}: task sources need n (how many rows), e.g. "
                         f"{{task: {spec.source['task']}, n: 2000}}")
    params = [p for p in inspect.signature(fn).parameters]
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise DataError(f"{spec.what}: unknown key(s) {unknown} for task '{spec.source['task']}'. Valid keys: "
                         f"task, {', '.join(params)}, {', '.join(COMMON_KEYS)}")
    n = args.pop("n")
    try:
        rows = fn(n, **args)
    except (ValueError, TypeError) as e:  # the generator's own check of its settings
        raise DataError(f"{spec.what}: {e}. Fix that setting of task '{spec.source['task']}'.") from None
    return _process_dataset(_rows_to_dataset(rows, spec.describe()), spec, spec.limit)


def _split_of_file(path: Path) -> str | None:
    head = path.name.lower().replace("-", ".").replace("_", ".").split(".")[0]
    return _SPLIT_NAMES.get(head)


def _local_files(root: Path, spec: _Spec) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in FILE_TYPES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise MissingFileError(f"{spec.what}.path: directory '{root}' holds no {', '.join(FILE_TYPES)} files.")
    named = {f: _split_of_file(f) for f in files}
    if not any(named.values()):
        return files
    want = _SPLIT_NAMES.get(str(spec.source.get("split", "train")).lower())
    chosen = [f for f, s in named.items() if s == want]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise DataError(f"{spec.what}: '{root}' has no files for split '{spec.source.get('split', 'train')}' "
                         f"(its files name the splits: {', '.join(found)}). Set split: to one of them.")
    return chosen


def _from_disk(root: Path, spec: _Spec) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        split = spec.source.get("split", "train")
        if split not in loaded:
            raise DataError(f"{spec.what}: '{root}' has splits {list(loaded)}, not '{split}'. Set split: to one.")
        loaded = loaded[split]
    return _process_dataset(loaded, spec, spec.limit)


def _from_local(root: Path, spec: _Spec) -> datasets.Dataset:
    if root.is_dir() and ((root / "dataset_dict.json").exists() or (root / "state.json").exists()):
        return _from_disk(root, spec)  # written by Dataset(Dict).save_to_disk
    parts, left = [], spec.limit
    for f in _local_files(root, spec):
        kind = FILE_TYPES.get(f.suffix)
        if kind is None:
            raise DataError(f"{spec.what}.path: '{f}' is not one of {', '.join(FILE_TYPES)}. Convert it, or give "
                             "a directory of such files.")
        if kind in ("jsonl", "json"):
            part = _load_json_file(f, kind, spec, left)
        else:
            raw = datasets.Dataset.from_parquet(str(f)) if kind == "parquet" else datasets.Dataset.from_csv(str(f))
            part = _process_dataset(raw, spec, left)
        parts.append(part)
        left = None if left is None else left - len(part)
        if left == 0:
            break
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _looks_local(path: str) -> bool:
    """Local when it exists, has a data-file suffix, starts like a path, has more than one '/', or its first
    part is a local directory (`data/trian` is a typo here, not a Hub id)."""
    p = Path(path).expanduser()
    return (p.exists() or p.suffix in FILE_TYPES or path.count("/") > 1 or path.startswith((".", "/", "~"))
            or ("/" in path and Path(path.split("/")[0]).is_dir()))


def _from_hub(spec: _Spec) -> datasets.Dataset:
    src = spec.source
    kwargs = {k: src[k] for k in ("name", "data_files", "revision") if k in src}
    try:
        ds = datasets.load_dataset(src["path"], split=src.get("split", "train"), **kwargs)
    except Exception as e:
        raise DataError(f"{spec.what}: could not load Hugging Face dataset '{src['path']}' ({type(e).__name__}: "
                         f"{e}). Check the id, name: and split:, and that the Hub is reachable. No local file or "
                         f"directory '{src['path']}' exists under {Path.cwd()}; for a local one, give its path "
                         "(e.g. ./data/train.jsonl).") from e
    return _process_dataset(ds, spec, spec.limit)


def locate_row(source: Mapping[str, Any], index: int) -> str:
    """Where row `index` of `load_rows(source)` came from: `file:line` for one JSONL file (blank lines skipped as the
    reader skips them), else `'<file>' row i` / `task '<name>' row i` (0-based)."""
    path = Path(str(source.get("path", ""))).expanduser()
    if "path" in source and path.is_file() and FILE_TYPES.get(path.suffix) in ("jsonl", "json"):
        with path.open(encoding="utf-8") as f:
            if not f.read(1024).lstrip().startswith("["):
                f.seek(0)
                lines = (n for n, line in enumerate(f, 1) if line.strip())
                lineno = next(itertools.islice(lines, index, None), None)
                if lineno is not None:
                    return f"{path}:{lineno}"
    where = f"task '{source['task']}'" if "task" in source else f"'{source.get('path')}'"
    return f"{where} row {index}"


def load_rows(source: Mapping[str, Any], required: Sequence[str], *, what: str = "data") -> datasets.Dataset:
    """Load `source` (see module docstring) and check it has the `required` text columns.

    `what` is the config path of `source` (e.g. "data.init_args.train"), used in error messages.
    """
    spec = _Spec(source, required, what)
    if "task" in spec.source:
        ds = _from_task(spec)
    else:
        path = spec.source["path"]
        if not isinstance(path, str) or not path:
            raise DataError(f"{what}.path must be a file, directory or dataset id string, got {path!r}")
        if _looks_local(path):
            root = Path(path).expanduser()
            if not root.exists():
                raise MissingFileError(f"{what}.path: '{path}' does not exist (relative paths start at "
                                        f"{Path.cwd()}). Fix the path.")
            ds = _from_local(root, spec)
        else:
            ds = _from_hub(spec)
    if len(ds) == 0:
        raise DataError(f"{what}: {spec.describe()} has no rows. Point it at data, or raise n / limit.")
    return ds
