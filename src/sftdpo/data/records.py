"""Rows of named fields from the files people have: CSV, TSV, JSON Lines (or a JSON list), Parquet, a
Hugging Face dataset saved with `save_to_disk`, or a dataset on the Hugging Face hub. Each row keeps
where it came from (`file:line`), so an error can name it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SftdpoError, hub_reachable
from .files import check_file, hub_offline

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    where: str  # "path:line" (or "dataset[split]:index"), for error messages
    fields: dict[str, Any]


def read_rows(path: str | Path, split: str | None = None) -> list[Row]:
    """The rows of a data file (its format from the extension) or of a `save_to_disk` directory (a
    Dataset, or a DatasetDict and `split`)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _saved_dataset(p, split)
    p = check_file(p)
    fmt = FILE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise SftdpoError(f"{p}: unknown data file type {p.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet "
                          "(or a directory written by datasets' save_to_disk)")
    try:
        if fmt in ("csv", "tsv"):
            with open(p, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
                rows = []
                for rec in reader:
                    if None in rec:
                        raise SftdpoError(f"{p}:{reader.line_num}: more fields than the header has columns; "
                                          "quote fields that hold the separator")
                    rows.append(Row(f"{p}:{reader.line_num}", dict(rec)))
                return rows
        if fmt == "parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415 - pyarrow comes with datasets; only Parquet needs it

            return [Row(f"{p}:row {i + 1}", r) for i, r in enumerate(pq.read_table(p).to_pylist())]
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SftdpoError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    except csv.Error as e:
        raise SftdpoError(f"{p}: unreadable as {fmt.upper()} ({e})") from None
    if fmt == "json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SftdpoError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return [_row(f"{p}:item {i + 1}", x) for i, x in enumerate(items)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(_row(f"{p}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SftdpoError(f"{p}:{n}: not a JSON object ({e.msg}); JSON Lines holds one object per line") from None
    return rows


def _row(where: str, value: Any) -> Row:
    if not isinstance(value, dict):
        raise SftdpoError(f"{where}: expected an object of named fields, got {type(value).__name__}")
    return Row(where, value)


def _saved_dataset(path: Path, split: str | None) -> list[Row]:
    import datasets  # noqa: PLC0415 - only for save_to_disk directories and hub datasets (~2 s to import)

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise SftdpoError(f"{path} is not a dataset saved with save_to_disk ({str(e).splitlines()[0][:120]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SftdpoError(f"{path} has splits {', '.join(ds)}; choose one with --train-split/--dev-split")
        ds = ds[split]
    return [Row(f"{path}[{split or 'dataset'}]:{i}", r) for i, r in enumerate(ds)]


def hub_rows(dataset: str, split: str) -> list[Row]:
    """A split of a dataset on the Hugging Face hub (or in its local cache, offline)."""
    import datasets  # noqa: PLC0415 - see _saved_dataset

    offline = not hub_reachable()
    try:
        with hub_offline(offline):
            ds = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "not available"
        why = "offline and not in the Hugging Face cache" if offline else "could not load it"
        raise SftdpoError(f"dataset {dataset!r} split {split!r}: {why} ({type(e).__name__}); give local files with "
                          "--train/--dev or a save_to_disk directory as --dataset") from None
    return [Row(f"{dataset}[{split}]:{i}", r) for i, r in enumerate(ds)]


def dataset_rows(dataset: str, split: str) -> list[Row]:
    """`--dataset`: a local save_to_disk directory, else a hub id."""
    if Path(dataset).expanduser().is_dir():
        return _saved_dataset(Path(dataset).expanduser(), split)
    return hub_rows(dataset, split)


def require_columns(rows: list[Row], columns: list[str], what: str) -> None:
    """Every row has every column in `columns`, or one error naming the first row without one."""
    for r in rows:
        missing = [c for c in columns if c not in r.fields]
        if missing:
            have = ", ".join(map(str, r.fields)) or "none"
            raise SftdpoError(f"{r.where}: no column {missing[0]!r} ({what}); the row has: {have}")
