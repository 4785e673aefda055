"""Rows of named fields from the files people have: CSV, TSV, JSON Lines (or a JSON list), Parquet, a
Hugging Face dataset saved with `save_to_disk`, or a dataset on the Hugging Face hub. Each row keeps
where it came from (`file:line`), so an error can name it. Text files are read as UTF-8 with or
without a byte-order mark (Excel's "CSV UTF-8" writes one)."""

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
            return _delimited(p, fmt)
        if fmt == "parquet":
            return _parquet(p)
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SftdpoError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
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


def _delimited(p: Path, fmt: str) -> list[Row]:
    """The rows of a CSV or TSV file under its header; a row with more or fewer fields than the
    header, or a field past the csv module's limit, is one error naming its line."""
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
        rows = []
        try:
            for rec in reader:
                if None in rec:
                    raise SftdpoError(f"{p}:{reader.line_num}: more fields than the header has columns; "
                                      "quote fields that hold the separator")
                if None in rec.values():
                    have = sum(v is not None for v in rec.values())
                    raise SftdpoError(f"{p}:{reader.line_num}: {have} field(s) where the header has {len(rec)} "
                                      f"({', '.join(rec)}); complete or remove that line")
                rows.append(Row(f"{p}:{reader.line_num}", dict(rec)))
        except csv.Error as e:  # line_num counts the lines before the row being read
            if "field larger than field limit" in str(e):
                raise SftdpoError(f"{p}:{reader.line_num + 1}: a field longer than {csv.field_size_limit():,} "
                                  "characters (an unclosed quote takes in the lines after it); close the quote, or "
                                  "shorten the field") from None
            raise SftdpoError(f"{p}:{reader.line_num + 1}: unreadable as {fmt.upper()} ({e})") from None
        return rows


def _parquet(p: Path) -> list[Row]:
    import pyarrow  # noqa: PLC0415 - pyarrow comes with datasets; only Parquet needs it
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        table = pq.read_table(p)
    except (pyarrow.ArrowException, OSError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise SftdpoError(f"{p}: not a readable Parquet file ({first[:160]}); write it again (e.g. pandas "
                          "DataFrame.to_parquet), or give another format") from None
    return [Row(f"{p}:row {i + 1}", r) for i, r in enumerate(table.to_pylist())]


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
