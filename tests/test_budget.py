"""--budget-steps: a run that takes exactly that many optimizer steps, cycling over its data."""

import json

import pytest

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.train.loop import Run, train

from conftest import qqp_files


def _cfg(files, **kw):
    base = dict(task="paraphrase", model="tiny-llama", device="cpu", precision="fp32", batch_size=8, lr=3e-3,
                eval_batch_size=8, log_every=1, warmup_ratio=0.2, eval_init=False, **files)
    return RunConfig(**{**base, **kw})


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("n_train,regime", [(5, "sft"), (40, "sft"), (40, "dpo")])
def test_budget_takes_exactly_that_many_steps_with_one_schedule(n_train, regime, cache, tmp_path):
    """13 optimizer steps whatever the data size: 5 rows (one step per pass: 13 passes) or 40 rows (5 steps
    per pass: 3 passes, the last cut short at 3 steps), SFT or DPO. The schedule spans the 13 steps (warm-up
    ceil(2.6) = 3, decay to exactly 0 at the last step), each pass is an epoch with its evaluation, and each
    pass draws a fresh order. Catches a budget counted in epochs, a schedule per pass (the rate would climb
    back up), a last pass run to its end, and passes repeating one order."""
    files = qqp_files(tmp_path, n_train, 8)
    out = tmp_path / "run"
    summary = train(_cfg(files, budget_steps=13, regime=regime, epochs=99, dpo_lr=1e-3), out)
    steps = _records(out, "train")
    per_pass = -(-n_train // 8)
    passes = -(-13 // per_pass)
    assert summary["optimizer_steps"] == len(steps) == 13 and summary["epochs"] == passes
    assert [r["global_step"] for r in steps] == list(range(1, 14))
    lr = 3e-3 if regime == "sft" else 1e-3
    assert [r["lr"] for r in steps] == [pytest.approx(lr * (i / 3 if i < 3 else (13 - i) / 10)) for i in range(1, 14)]
    epochs = _records(out, "epoch")
    assert [e["epoch"] for e in epochs] == list(range(1, passes + 1)) and all("dev/accuracy" in e for e in epochs)
    assert [sum(r["epoch"] == e for r in steps) for e in range(1, passes + 1)] == \
        [per_pass] * (passes - 1) + [13 - per_pass * (passes - 1)]
    if n_train == 40:  # a fresh batch order per pass
        run = Run(_cfg(files, budget_steps=13), tmp_path / "probe")
        run.build()
        orders = [[b.index.tolist() for w in run.objective("sft").steps(e) for b in w] for e in (1, 2)]
        assert orders[0] != orders[1] and sorted(sum(orders[0], [])) == sorted(sum(orders[1], []))


def test_budget_run_resumes_to_the_uninterrupted_result(cache, tmp_path):
    """Interrupted after its second pass, a budget run resumes to the same records and metrics. Catches
    a resume that restarts the budget (or the schedule) from zero."""
    files = qqp_files(tmp_path, 16, 8)
    cfg = _cfg(files, budget_steps=5)  # 2 steps per pass: passes of 2, 2, 1 steps

    def strip(out):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_s", "eval_s")}
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    train(cfg, tmp_path / "ref")

    class Stop(Exception):
        pass

    def stop(epoch):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        Run(cfg, tmp_path / "part", on_checkpoint=stop).train()
    summary = Run(cfg, tmp_path / "part").train()
    assert strip(tmp_path / "part") == strip(tmp_path / "ref") and summary["optimizer_steps"] == 5


def test_budget_identity_and_refusals():
    """With a budget, --epochs cannot change the run (same hash); a staged run refuses a budget, and so
    does a budget below 1. Without a budget the hash is what it was before the field existed."""
    a = RunConfig(budget_steps=100, epochs=3)
    assert a.hash() == RunConfig(budget_steps=100, epochs=7).hash() != RunConfig(budget_steps=101).hash()
    assert RunConfig(epochs=3).hash() != RunConfig(epochs=7).hash()
    assert "budget_steps" not in RunConfig().identity()
    with pytest.raises(SftdpoError, match="single-stage"):
        RunConfig(budget_steps=10, regime="sft-dpo", epochs=3, handoff_epoch=1).validate()
    with pytest.raises(SftdpoError, match="budget-steps must be >= 1"):
        RunConfig(budget_steps=0).validate()
