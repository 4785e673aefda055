"""Quora Question Pairs for paraphrase detection: every file layout people have (the CS224N GPT-2 and
minBERT project files, the GLUE and Kaggle releases, a headerless label/q1/q2/id split) and GLUE QQP
online. Where each file comes from and what is odd about it is described in the data directory's
SOURCE.md files; the quirks handled here are commented where they are handled."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn

from ..config import SftdpoError, data_dirs, hub_reachable
from ..files import atomic_path
from .files import check_file, first_line, hub_offline

log = logging.getLogger("sftdpo")

@dataclass(frozen=True)
class ParaphraseExample:
    id: str
    q1: str
    q2: str
    label: int | None  # 1 = duplicate, 0 = not; None in unlabelled (test) files


@dataclass
class ParaphraseData:
    train: list[ParaphraseExample]
    dev: list[ParaphraseExample]
    source: str
    dev_dropped_overlap: int  # dev pairs dropped because they also occur in train


QQP_FORMATS = ("cs224n-gpt", "cs224n-minbert", "label-q1-q2-id", "glue-qqp", "kaggle-csv")
# The CS224N files carry a few broken records (truncated multi-line questions with an empty label);
# the course's loader skips them, so we do too. Every other format is read strictly.
_LENIENT = {"cs224n-gpt", "cs224n-minbert"}
_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}

_GPT_HEAD = ["id", "sentence1", "sentence2"]
_GLUE_HEAD = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
_GLUE_TEST_HEAD = ["id", "question1", "question2"]
_KAGGLE_TEST_HEAD = ["test_id", "question1", "question2"]
_NO_QQP_DATA = ("no QQP data: put the CS224N quora-*.csv files (or GLUE QQP TSVs) in $SFTDPO_DATA_DIR/qqp/, "
                "or pass --train/--dev, or go online for GLUE QQP")


def detect_qqp_format(path: str | Path) -> str:
    """Name the QQP layout of `path` from its first line (extensions lie: CS224N's .csv files are TSV)."""
    p = check_file(path)
    line = first_line(p)
    tab = line.split("\t")
    if tab in (_GPT_HEAD, _GPT_HEAD + ["is_duplicate"]):
        return "cs224n-gpt"
    if tab in ([""] + _GPT_HEAD, [""] + _GPT_HEAD + ["is_duplicate"]):
        return "cs224n-minbert"
    if tab in (_GLUE_HEAD, _GLUE_TEST_HEAD):
        return "glue-qqp"
    if len(tab) == 4 and tab[0] in ("0", "1") and tab[3].strip().isdigit():
        return "label-q1-q2-id"
    comma = next(csv.reader([line]), [])
    if comma in (_GLUE_HEAD, _KAGGLE_TEST_HEAD):
        return "kaggle-csv"
    raise SftdpoError(
        f"{p}: unknown QQP file format (first line {line[:60]!r}); known: {', '.join(QQP_FORMATS)} "
        "- see `detect_qqp_format` in sftdpo/data.py for their headers")


def _unescape(field: str) -> str:
    """Undo one extra level of CSV quoting: '"Do I need ""the"" here?"' -> 'Do I need "the" here?'.

    The CS224N minBERT release escaped ~700 questions twice, and raw Quora TSVs read by plain tab
    splitting (Deep1994's, GLUE's) keep one level, so after reading they look like that. We undo it only when the
    whole field is wrapped in quotes AND holds at least one doubled quote AND no lone quote: that
    shape only arises from CSV escaping (a wrapped field without inner quotes is left alone).
    """
    if len(field) >= 4 and field[0] == '"' and field[-1] == '"':
        inner = field[1:-1]
        if '""' in inner and '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return field


def _iter_tsv(path: Path, errors: str = "strict") -> Iterator[tuple[int, list[str]]]:
    """Plain tab splitting (raw quotes kept), as GLUE/Quora TSVs need; yields (line number, fields)."""
    with open(path, encoding="utf-8-sig", errors=errors, newline="") as f:  # -sig: a byte-order mark dropped
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line.split("\t")


def read_qqp_with_stats(path: str | Path, fmt: str | None = None) -> tuple[list[ParaphraseExample], str, int]:
    """Read a QQP file; returns (examples, format name, rows skipped as broken)."""
    p = check_file(path)
    fmt = fmt or detect_qqp_format(p)
    if fmt not in QQP_FORMATS:
        raise SftdpoError(f"unknown QQP format {fmt!r}; known: {', '.join(QQP_FORMATS)}")
    out: list[ParaphraseExample] = []
    skipped = 0
    replaced = 0
    extra = 0

    def bad(lineno: int, what: str) -> NoReturn:
        raise SftdpoError(f"{p}, line {lineno}: {what} (format {fmt}); fix or remove that line")

    def label(value: str, lineno: int) -> int:
        if value.strip() not in _LABELS:
            bad(lineno, f"label {value!r} is not 0/1")
        return _LABELS[value.strip()]

    try:
        if fmt in _LENIENT:
            # csv.DictReader(delimiter="\t") exactly like the course's loader (datasets.py::load_paraphrase_data),
            # so the same rows survive with the same ids: a row missing a field or its label is skipped, a row
            # with extra fields is kept (its named fields read), ids are lower-cased and stripped
            # (utf-8-sig: a byte-order mark would otherwise be part of the first column's name).
            with open(p, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t")
                labelled = "is_duplicate" in (reader.fieldnames or [])
                for rec in reader:
                    q1, q2, rid = rec.get("sentence1"), rec.get("sentence2"), rec.get("id")
                    raw = (rec.get("is_duplicate") or "").strip()
                    if labelled and raw and raw not in _LABELS and None not in rec:  # a label, but not 0/1
                        bad(reader.line_num, f"label {raw!r} is not 0/1")
                    lab = _LABELS.get(raw) if labelled else None
                    if q1 is None or q2 is None or rid is None or (labelled and lab is None):
                        skipped += 1
                        continue
                    extra += None in rec
                    out.append(ParaphraseExample(rid.lower().strip(), _unescape(q1), _unescape(q2), lab))
        elif fmt == "label-q1-q2-id":
            # Deep1994's split was written after a lossy decode: some lines are invalid UTF-8.
            for lineno, row in _iter_tsv(p, errors="replace"):
                if len(row) != 4:
                    bad(lineno, f"{len(row)} tab-separated fields, expected 4 (label, q1, q2, id)")
                replaced += any("\ufffd" in x for x in row)
                out.append(ParaphraseExample(row[3].strip(), _unescape(row[1]), _unescape(row[2]),
                                             label(row[0], lineno)))
        elif fmt == "glue-qqp":
            rows = _iter_tsv(p)
            _, head = next(rows, (0, _GLUE_HEAD))
            test = head == _GLUE_TEST_HEAD
            for lineno, row in rows:
                if len(row) != len(head):
                    bad(lineno, f"{len(row)} tab-separated fields, expected {len(head)}")
                if test:
                    out.append(ParaphraseExample(row[0], _unescape(row[1]), _unescape(row[2]), None))
                else:
                    out.append(ParaphraseExample(row[0], _unescape(row[3]), _unescape(row[4]), label(row[5], lineno)))
        else:  # kaggle-csv: a proper comma CSV (quoted fields, embedded newlines), read once, no unescaping
            with open(p, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                head = next(reader, _GLUE_HEAD)
                for row in reader:
                    if not row:
                        continue
                    if len(row) != len(head):
                        bad(reader.line_num, f"{len(row)} comma-separated fields, expected {len(head)}")
                    if head == _KAGGLE_TEST_HEAD:
                        out.append(ParaphraseExample(row[0], row[1], row[2], None))
                    else:
                        out.append(ParaphraseExample(row[0], row[3], row[4], label(row[5], reader.line_num)))
    except UnicodeDecodeError as e:
        raise SftdpoError(f"{p}: not valid UTF-8 ({e.reason}); re-save it as UTF-8") from None
    except csv.Error as e:
        raise SftdpoError(f"{p}: unreadable as {fmt} ({e}); check the file") from None

    note = f"; {skipped:,} broken rows skipped" if skipped else ""
    note += f"; {extra:,} rows with extra fields kept (their named fields read, as the course's loader)" if extra else ""
    note += f"; {replaced:,} lines had invalid UTF-8 (replaced)" if replaced else ""
    level = logging.WARNING if skipped > 0.01 * max(1, len(out) + skipped) else logging.INFO
    log.log(level, "read %s pairs from %s (format %s%s)", f"{len(out):,}", p, fmt, note)
    return out, fmt, skipped


def read_qqp(path: str | Path, fmt: str | None = None) -> tuple[list[ParaphraseExample], str]:
    """Read a QQP file in any known format; returns (examples, format name)."""
    examples, fmt, _ = read_qqp_with_stats(path, fmt)
    return examples, fmt


# -- GLUE QQP from the Hugging Face hub ----------------------------------------------------------

def load_glue_qqp(split: str) -> list[ParaphraseExample]:
    """GLUE QQP `split` (train/validation/test) via `datasets`, kept in the Hugging Face cache.

    Offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, or the hub unreachable) only the cache is
    tried, so a machine without network fails in seconds instead of retrying for minutes.
    """
    offline = not hub_reachable()
    why = "offline and not in the Hugging Face cache" if offline else "download failed"
    try:
        import datasets

        with hub_offline(offline):
            ds = datasets.load_dataset("nyu-mll/glue", "qqp", split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "not available"
        raise SftdpoError(f"GLUE QQP {split!r} unavailable ({why}: {type(e).__name__}): put QQP files in "
                          "$SFTDPO_DATA_DIR/qqp/ or pass --train/--dev") from None
    out = [ParaphraseExample(str(r["idx"]), r["question1"], r["question2"], None if r["label"] < 0 else int(r["label"]))
           for r in ds]
    log.info("read %s pairs from GLUE QQP %s (nyu-mll/glue via datasets)", f"{len(out):,}", split)
    return out


# -- assembling train/dev ------------------------------------------------------------------------

def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def normalise_pair(q1: str, q2: str) -> str:
    """Dedupe key of a question pair: lower-cased, whitespace-folded, order-insensitive
    (QQP lists the same pair either way round)."""
    a, b = sorted((_norm(q1), _norm(q2)))
    return f"{a}\n{b}"


def dedupe_against(train: list[ParaphraseExample], dev: list[ParaphraseExample]) -> tuple[list[ParaphraseExample], int]:
    """Drop dev pairs whose question pair (normalised, either order) occurs in train; returns (kept, dropped)."""
    seen = {normalise_pair(e.q1, e.q2) for e in train}
    kept = [e for e in dev if normalise_pair(e.q1, e.q2) not in seen]
    return kept, len(dev) - len(kept)


def _labelled(examples: list[ParaphraseExample], what: str, path: object) -> list[ParaphraseExample]:
    if not examples:
        raise SftdpoError(f"{what} file {path} has no rows; pass a QQP file with data as --{what}")
    kept = [e for e in examples if e.label is not None]
    if not kept:
        raise SftdpoError(f"{what} file {path} has no labels (a test file?); pass a labelled QQP file as --{what}")
    if len(kept) < len(examples):
        log.warning("%s: dropped %d unlabelled rows", path, len(examples) - len(kept))
    return kept


# Preference order inside a data directory's qqp/ folder. The GPT-project names at the top level come
# first (students copy their course files there); the 30-row "-30" heads are format samples, never data.
_TRAIN_CANDIDATES = ("quora-train.csv", "cs224n-minbert/quora-train.csv",
                     "cs224n-minbert-train-subset/quora-train.csv", "train.tsv")
_DEV_CANDIDATES = ("quora-dev.csv", "cs224n-minbert/quora-dev.csv", "dev.tsv", "deep1994-balanced/dev.tsv")


def _pick(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def load_paraphrase_data(train: str | None = None, dev: str | None = None) -> ParaphraseData:
    """Train/dev QQP pairs: explicit paths, else the data directory's qqp/, else GLUE QQP online.

    Dev is always deduplicated against train so that dev accuracy is not inflated by memorised pairs.
    """
    def read(path: Path, what: str) -> tuple[list[ParaphraseExample], str]:
        ex, fmt = read_qqp(path)
        ex = _labelled(ex, what, path)
        return ex, f"{fmt}, {len(ex):,} rows"

    if train or dev:
        if not (train and dev):
            raise SftdpoError("--train and --dev are both needed (QQP files); pass both, or neither to use the data directory")
        tr, tr_desc = read(Path(train), "train")
        dv, dv_desc = read(Path(dev), "dev")
        source = f"files: train={train} ({tr_desc}), dev={dev} ({dv_desc})"
    else:
        found = None
        for d in data_dirs():
            folder = d / "qqp"
            if not folder.is_dir():
                continue
            tr_path, dv_path = _pick(folder, _TRAIN_CANDIDATES), _pick(folder, _DEV_CANDIDATES)
            if tr_path and dv_path:
                found = folder, tr_path, dv_path
                break
            log.warning("%s has no usable %s file; skipping it", folder, "train" if not tr_path else "dev")
        if found:
            folder, tr_path, dv_path = found
            tr, tr_desc = read(tr_path, "train")
            dv, dv_desc = read(dv_path, "dev")
            source = (f"data dir {folder}: train={tr_path.relative_to(folder)} ({tr_desc}), "
                      f"dev={dv_path.relative_to(folder)} ({dv_desc})")
        else:
            try:
                tr, dv = load_glue_qqp("train"), load_glue_qqp("validation")
            except SftdpoError:
                raise SftdpoError(_NO_QQP_DATA) from None
            source = f"GLUE QQP (nyu-mll/glue via datasets): train={len(tr):,}, validation={len(dv):,}"
    dv, dropped = dedupe_against(tr, dv)
    if not dv:
        raise SftdpoError(f"every dev pair also occurs in train ({source}): is --dev the train file? "
                          "Give a dev file with pairs not in train")
    if dropped:
        log.info("dropped %d dev pairs that also occur in train", dropped)
    return ParaphraseData(train=tr, dev=dv, source=source, dev_dropped_overlap=dropped)


def qqp_available() -> str | None:
    """None if QQP data can be had (files or GLUE online), else the one-line reason with the fix."""
    try:
        load_paraphrase_data()
    except SftdpoError as e:
        return str(e)
    return None


def write_paraphrase_predictions(path: str | Path, rows: list[tuple[str, int, int | None]]) -> None:
    """CSV `id,prediction,label` (label empty when unknown)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "prediction", "label"])
        for rid, pred, lab in rows:
            w.writerow([rid, pred, "" if lab is None else lab])
