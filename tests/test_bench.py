"""`sftdpo bench`: the lines, the table and the JSON, the TRL comparison, FFT vs LoRA measurements.
(The optimised paths the bench measures are held to the plain computations in test_ops.py and
test_dpo.py.) Tiny models; the smoke tests use the data directory's files like the bench does."""

from __future__ import annotations

import json
import logging

import pytest

from sftdpo import bench

from conftest import require_tiny_gpt2


def test_bench_lines_table_and_json(tmp_path, cache, monkeypatch):
    """The generate/sonnet line on tiny-gpt2, two prompts each side: both sides generate the same greedy
    tokens (so the ratio compares equal work), and each side's figure is the median over its timed runs
    of generated tokens per second. The table and the markdown mark a line by its ratio against its
    target (generate/sonnet: >= 10, the README's): hand-set figures of 30 and 15 tokens/s against 2 give
    15.00x, met, and 7.50x, missed; a line without a peer figure has no ratio. Catches the ratio
    inverted (peer / sftdpo), a target compared the wrong way or always met, a side timed on fewer
    tokens than the other (a sftdpo side that stops early looks faster), the mean or the sum taken for
    the median."""
    import statistics
    from dataclasses import asdict

    require_tiny_gpt2()
    monkeypatch.setitem(bench.GEN, "cpu", dict(prompts=2, loop_prompts=2, new_tokens=6))
    res = bench.run_bench(["tiny-gpt2"], steps=1, device="cpu", only=["generate/sonnet"])
    lines = {ln["name"]: ln for ln in res["models"]["tiny-gpt2"]["lines"]}
    assert set(lines) == {"generate/sonnet"}
    g = lines["generate/sonnet"]
    ours, loop = g["details"]["sftdpo"]["runs"], g["details"]["loop"]["runs"]
    # (tokens/s, seconds, tokens) per timed run: the batched side's every run generates what the loop's
    # one-prompt-at-a-time runs generate together
    assert len(ours) == 3 and len(loop) == 2 and all(t == sum(n for _, _, n in loop) > 0 for _, _, t in ours)
    assert g["sftdpo"] == pytest.approx(statistics.median(t / s for _, s, t in ours), rel=1e-12)
    assert g["peer"] == pytest.approx(statistics.median(t / s for _, s, t in loop), rel=1e-12)
    made = [bench.Line("generate/sonnet", "w", "tokens/s", 30.0, 2.0, "loop").finish(),
            bench.Line("generate/sonnet", "w", "tokens/s", 15.0, 2.0, "loop").finish(),
            bench.Line("generate/sonnet", "w", "tokens/s", 15.0, None, "loop").finish()]
    assert [(m.ratio, m.target, m.met) for m in made] == [(15.0, 10.0, True), (7.5, 10.0, False), (None, 10.0, None)]
    res["models"]["tiny-gpt2"]["lines"] = [asdict(m) for m in made]
    table = bench.format_table(res).splitlines()
    rows = [ln for ln in table if ln.startswith("generate/sonnet")]
    assert len(rows) == 3 and "CS224N" not in rows[0]
    assert rows[0].split()[1:5] == ["30.00", "2.00", "15.00x", ">=10"] and rows[0].split()[5] == "ok"
    assert rows[1].split()[1:6] == ["15.00", "2.00", "7.50x", ">=10", "MISS"]
    assert rows[2].split()[1:4] == ["15.00", "n/a", "n/a"]
    md = bench.format_markdown(res)
    assert "| 15.00x | ≥ 10 met |" in md and "| 7.50x | ≥ 10 **not met** |" in md
    json.dumps(res, default=str)


def test_bench_against_trl_smoke(tmp_path, cache):
    require_tiny_gpt2()
    if bench.trl_available():
        pytest.skip("TRL is not installed (pip install -e .[bench])")
    res = bench.run_bench(["tiny-gpt2"], steps=1, device="cpu", only=["sft/paraphrase"])
    (line,) = res["models"]["tiny-gpt2"]["lines"]
    assert line["name"] == "sft/paraphrase" and line["peer"] > 0 and line["sftdpo"] > 0
    assert line["details"]["trl"]["completion_only_loss"] is True and line["details"]["trl"]["timed_steps"] == 1


def test_fft_and_lora_measurements(cache):
    require_tiny_gpt2()
    spec = dict(model="tiny-gpt2", device="cpu", precision="fp32", batch=2, n_train=4, warmup=1, steps=1)
    try:  # in this process: _param_child silences logging for the child process it is meant for
        fft, lora = [bench._param_child({**spec, "param": p}) for p in ("fft", "lora")]
    finally:
        logging.disable(logging.NOTSET)  # else every later test's warning lines vanish (logging.disable is global)
    assert fft["trainable"] == fft["total"] and lora["total"] > fft["total"] > 100 * lora["trainable"] > 0
    assert fft["summary"]["timed_steps"] == lora["summary"]["timed_steps"] == 1
    assert fft["peak_memory_mb"] > 0 and lora["peak_memory_mb"] > 0


def test_study_jobs_line_runs_both_sides_with_the_same_results(cache, tmp_path, monkeypatch):
    """The study/jobs line: quick's six paraphrase runs with --jobs 1 and with --jobs 2, on a learnable
    QQP set written for the test and at learning rates at which a tiny model learns (at quick's own, every
    run of tiny-gpt2 ends as the untrained model, six equal result lines that any two sides would share).
    Compared here, not through the line's own flag: both sides finished the same six runs with the same
    dev metrics, and the runs' metrics differ from one another. Catches a side whose runs fail or run
    another configuration, results paired with the wrong runs, the flag computed as always true,
    runs/hour on the other side's wall time."""
    import copy
    import os

    from oracle import write_qqp_pairs
    from sftdpo.config import find_in_data_dirs

    require_tiny_gpt2()
    data = tmp_path / "data"
    (data / "qqp").mkdir(parents=True)
    write_qqp_pairs(data / "qqp" / "quora-train.csv", 64, seed=0)
    write_qqp_pairs(data / "qqp" / "quora-dev.csv", 48, seed=1)
    os.symlink(find_in_data_dirs("gpt2-tokenizer"), data / "gpt2-tokenizer")
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(data))
    quick = bench.load_spec

    def learning(name):
        spec = copy.deepcopy(quick(name))
        spec["overrides"].append({"when": {"task": "paraphrase"}, "set": {"lr": 1e-2, "dpo_lr": 1e-2}})
        return spec

    monkeypatch.setattr(bench, "load_spec", learning)
    res = bench.run_bench(["tiny-gpt2"], steps=1, device="cpu", only=["study/jobs"])
    (line,) = res["models"]["tiny-gpt2"]["lines"]
    assert line["name"] == "study/jobs" and line["unit"] == "runs/h"
    d = line["details"]
    one, two = d["results"][1], d["results"][2]
    assert sorted(one) == sorted(two) and len(one) == 6
    assert all(one[run] == two[run] for run in one), {r: (one[r], two[r]) for r in one if one[r] != two[r]}
    assert all(v.startswith("accuracy=") for v in one.values()) and len(set(one.values())) >= 3, one
    assert d["results_identical"] is True
    assert line["sftdpo"] == pytest.approx(6 * 3600 / d["wall_s"]["jobs2"]) and line["peer"] == pytest.approx(
        6 * 3600 / d["wall_s"]["jobs1"])


def test_too_few_steps_for_the_warm_up_is_one_line_that_says_why():
    """Data that gives no more optimizer steps than the untimed warm-up (a data directory with few
    sonnets): one line saying so, not "use --steps >= 1" to a user who asked for 8."""
    from sftdpo.bench import summarise_steps
    from sftdpo.config import SftdpoError

    step = {"s": 0.5, "tokens": 100, "rows": 4, "loss": 1.0}
    with pytest.raises(SftdpoError, match=r"the data gave 1 optimizer step\(s\), 1 of them untimed warm-up"):
        summarise_steps([step], warmup=1)
    assert summarise_steps([step, {**step, "s": 0.25}], warmup=1)["tokens_per_s"] == 400.0
