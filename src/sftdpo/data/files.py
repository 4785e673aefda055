"""Opening data files: one clear error for a missing file, the first line for format detection."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from ..config import SftdpoError


def first_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:  # -sig: a byte-order mark dropped
        return f.readline().rstrip("\r\n")


def check_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SftdpoError(f"data file not found: {p}; check the path (or $SFTDPO_DATA_DIR)")
    return p


@contextlib.contextmanager
def hub_offline(on: bool) -> Iterator[None]:
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
