"""`sftdpo bench`: the lines, the table and the JSON, the TRL comparison, FFT vs LoRA measurements.
(The optimised paths the bench measures are held to the plain computations in test_ops.py and
test_dpo.py.) Tiny models; the smoke tests use the data directory's files like the bench does."""

from __future__ import annotations

import json

import pytest

from sftdpo import bench

from conftest import require_tiny_gpt2


def test_bench_lines_table_and_json(tmp_path, cache, monkeypatch):
    require_tiny_gpt2()
    monkeypatch.setitem(bench.GEN, "cpu", dict(prompts=3, loop_prompts=1, new_tokens=6))
    res = bench.run_bench(["tiny-gpt2"], steps=1, device="cpu", only=["generate/sonnet"])
    lines = {ln["name"]: ln for ln in res["models"]["tiny-gpt2"]["lines"]}
    assert set(lines) == {"generate/sonnet"}
    g = lines["generate/sonnet"]
    assert g["sftdpo"] > 0 and g["peer"] > 0 and g["ratio"] == pytest.approx(g["sftdpo"] / g["peer"])
    assert g["target"] == 10.0 and g["met"] in (True, False)
    table = bench.format_table(res)
    assert "generate/sonnet" in table and "CS224N loop" in table
    json.dumps(res, default=str)
    assert "| `generate/sonnet` |" in bench.format_markdown(res)


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
    fft, lora = (bench._param_child({**spec, "param": p}) for p in ("fft", "lora"))
    assert fft["trainable"] == fft["total"] and lora["total"] > fft["total"] > 100 * lora["trainable"] > 0
    assert fft["summary"]["timed_steps"] == lora["summary"]["timed_steps"] == 1
    assert fft["peak_memory_mb"] > 0 and lora["peak_memory_mb"] > 0


def test_study_jobs_line_runs_both_sides_with_the_same_results(cache):
    require_tiny_gpt2()
    res = bench.run_bench(["tiny-gpt2"], steps=1, device="cpu", only=["study/jobs"])
    (line,) = res["models"]["tiny-gpt2"]["lines"]
    assert line["name"] == "study/jobs" and line["unit"] == "runs/h" and line["sftdpo"] > 0 and line["peer"] > 0
    d = line["details"]
    assert line["ratio"] == pytest.approx(d["wall_s"]["jobs1"] / d["wall_s"]["jobs2"])
    assert d["results_identical"] and len(d["results"][1]) == 6 and all("accuracy=" in r for r in d["results"][1].values())
