"""Shared test helpers: fixture data written for this repo, tiny models, and an isolated cache."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

FIX = Path(__file__).parent / "fixtures" / "data"
SONNET_FILES = dict(train=str(FIX / "sonnets" / "sonnets.txt"), dev=str(FIX / "sonnets" / "TRUE_sonnets_held_out_dev.txt"))

_SHARED_CACHE: Path | None = None

# the independent evaluator's base models and a run whose dev metric peaks mid-run (tests/oracle.py)
from oracle import gpt2_base, gpt2_noisy, llama_base, peaked_run  # noqa: E402, F401


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """Under mutmut (`make mutate` sets MUTANT_UNDER_TEST), leave out the tests of the mutation tool itself:
    they reach no mutated code, and mutmut stops on a new test that reaches none ("could not find any test
    case for any mutant")."""
    if collection_path.name == "test_mutate_tool.py" and os.environ.get("MUTANT_UNDER_TEST"):
        return True
    return None


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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as JSON lines (the own-task readers' format)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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


def qqp_files(folder: Path, n_train: int, n_dev: int) -> dict[str, str]:
    """`train`/`dev` paths of a synthetic QQP pair of files (seeds 0 and 1) in `folder`."""
    return dict(train=str(write_synthetic_qqp(folder / "train.csv", n_train, seed=0)),
                dev=str(write_synthetic_qqp(folder / "dev.csv", n_dev, seed=1)))


# -- tiny models on small data written for the tests (the paths compared in test_ops/test_dpo) ---------


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, dict]:
    """Twelve sonnets of 5 to 10 lines (so batches need padding) and 16 QQP pairs, written for these tests."""
    d = tmp_path_factory.mktemp("tiny-data")
    lines = [ln.strip() for ln in (FIX / "sonnets" / "sonnets.txt").read_text().splitlines()
             if ln.strip() and not ln.strip().isdigit()][3:]
    chunks = []
    for i in range(12):
        n = 5 + (i * 7) % 6
        chunks.append(f"{i + 1}\n\n" + "\n".join(lines[(i + j) % len(lines)] for j in range(n)))
    (d / "sonnets.txt").write_text("Header\n\n" + "\n\n".join(chunks) + "\n")
    (d / "dev.txt").write_text("Header\n\n" + "\n\n".join(chunks[:3]) + "\n")
    write_synthetic_qqp(d / "train.csv", 16, seed=1)
    write_synthetic_qqp(d / "dev.csv", 8, seed=2)
    return {"paraphrase": dict(train=str(d / "train.csv"), dev=str(d / "dev.csv")),
            "sonnet": dict(train=str(d / "sonnets.txt"), dev=str(d / "dev.txt"))}


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def tiny(request, cache):
    """(name, model, tokenizer) of a seeded tiny model in eval mode (dropout off: paths compared on one function)."""
    from sftdpo.models import load_model

    if request.param == "tiny-gpt2":
        require_tiny_gpt2()
    model, tok = load_model(request.param, seed=1)
    model.eval()
    return request.param, model, tok


def make_tiny_task(data: dict, task: str, model: str, tok, **kw):
    """(config, task) for a tiny model on `tiny_data`."""
    from sftdpo.config import RunConfig
    from sftdpo.tasks import make_task

    cfg = RunConfig(**{"task": task, "model": model, "batch_size": 4, "max_train_examples": 12, "max_dev_examples": 4,
                       "device": "cpu", "precision": "fp32", **data[task], **kw})
    return cfg, make_task(cfg, tok)


def plain_token_logps(model, batch) -> torch.Tensor:
    """The plain path: the model's full forward, fp32 log-softmax over every position, (B, L-1), 0 where ignored."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    target = batch.labels[:, 1:]
    mask = target != -100
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return lp * mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm relative difference |a - b|_max / |b|_max."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
