"""`--compile`: the decoder through torch.compile (ops.logprobs.compile_decoder) trains and
evaluates like the eager model, with one compiled graph for all the batch shapes a run meets."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

from sftdpo.config import RunConfig
from sftdpo.objectives.sft import SFTObjective
from sftdpo.train.loop import Run

from conftest import qqp_files


def _records(run_dir) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"} for r in rows]


def test_compiled_run_equals_eager_with_one_graph_for_every_length(cache, tmp_path):
    train, dev = qqp_files(tmp_path, 24, 8).values()
    base = RunConfig(task="paraphrase", model="tiny-llama", regime="sft-dpo", epochs=2, handoff_epoch=1, batch_size=8,
                     lr=3e-3, dpo_lr=1e-3, eval_batch_size=8, log_every=1, device="cpu", precision="fp32",
                     train=str(train), dev=str(dev))
    eager = Run(base, tmp_path / "eager")
    eager.train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Run(RunConfig(**{**base.to_dict(), "compile": True}), tmp_path / "compiled")
    try:
        compiled.train()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled.cfg.hash() == eager.cfg.hash()  # the same run, computed another way
    shapes = {tuple(b.input_ids.shape) for w in SFTObjective(compiled.task).steps(1) for b in w}
    # static shapes would compile a graph per shape (and per train/eval mode); dynamic ones a few in all
    assert len(shapes) >= 3 and 1 <= graphs <= 4, (shapes, graphs)
    a, b = _records(tmp_path / "eager"), _records(tmp_path / "compiled")
    assert [r["kind"] for r in a] == [r["kind"] for r in b] and len(a) > 6
    for ra, rb in zip(a, b):
        # fp32, fused kernels sum in another order: rounding of ~1e-7 relative per op, grown over a few
        # AdamW steps; a wrong graph (a mask or position dropped) moves losses by whole percents
        num = lambda r: {k: v for k, v in r.items() if isinstance(v, float)}  # noqa: E731
        assert {k: v for k, v in rb.items() if k not in num(rb)} == {k: v for k, v in ra.items() if k not in num(ra)}
        assert num(rb) == pytest.approx(num(ra), rel=1e-4, abs=1e-5)
