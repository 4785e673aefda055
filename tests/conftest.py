"""Shared test helpers: fixture data written for this repo, tiny models, and an isolated cache."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

FIX = Path(__file__).parent / "fixtures" / "data"
SONNET_FILES = dict(train=str(FIX / "sonnets" / "sonnets.txt"), dev=str(FIX / "sonnets" / "TRUE_sonnets_held_out_dev.txt"))

_SHARED_CACHE: Path | None = None


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the whole session: converted tokenizers are built once, not per test."""
    return tmp_path_factory.mktemp("sftdpo-cache")


@pytest.fixture
def cache(shared_cache, monkeypatch) -> Path:
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(shared_cache))
    return shared_cache


def require_tiny_gpt2() -> None:
    from sftdpo.config import SftdpoError
    from sftdpo.models import load_model

    try:
        load_model("tiny-gpt2")
    except SftdpoError as e:
        pytest.skip(f"tiny-gpt2 needs the GPT-2 tokenizer (set SFTDPO_DATA_DIR to a folder with gpt2-tokenizer/): {e}")


def write_synthetic_qqp(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable paraphrase set in the CS224N GPT format: duplicates repeat the question with a
    light rewording, non-duplicates pair unrelated questions."""
    rng = random.Random(seed)
    topics = ["juggle", "bake bread", "learn Rust", "fix a bike", "grow tomatoes", "paint a wall", "swim faster",
              "write poems", "sleep better", "save money", "train a dog", "play chess", "brew coffee", "speak Dutch"]
    rows = ["id\tsentence1\tsentence2\tis_duplicate"]
    for i in range(n):
        a = rng.choice(topics)
        if i % 2 == 0:
            rows.append(f"{i} q{i}\tHow do I {a}?\tWhat is the best way to {a}?\t1.0")
        else:
            b = rng.choice([t for t in topics if t != a])
            rows.append(f"{i} q{i}\tHow do I {a}?\tWhy do people {b}?\t0.0")
    path.write_text("\n".join(rows) + "\n")
    return path
