"""Report from a synthetic study: tables carry the right numbers, files and figures are written."""

import csv
from pathlib import Path

import numpy as np
import pytest

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.report import PAPER, write_report
from sftdpo.store import Store

N_DEV = 200
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REFS = [str(x) for x in np.random.default_rng(0).integers(0, 2, N_DEV)]
TRUE_SONNETS = [f"Line {i} of sonnet {j}, with thee and thou and summer's day" for j in range(12) for i in range(1)]


class Builder:
    def __init__(self, root: Path):
        self.store = Store(root / "study.db")
        self.order = 0

    def add(self, status="done", error=None, final=None, wall=10.0, **kw):
        cfg = RunConfig(**kw).validate()
        h = cfg.hash()
        self.store.add_run(h, f"{cfg.task}-{cfg.regime}-{cfg.param}-s{cfg.seed}-{self.order}", cfg.to_dict(), f"runs/{h}", self.order)
        self.order += 1
        if status == "pending":
            return h
        self.store.set_status(h, "running")
        if status == "failed":
            self.store.set_status(h, "failed", error)
            return h
        key = "dev/accuracy" if cfg.task == "paraphrase" else "dev/chrf"
        scale = 1.0 if cfg.task == "paraphrase" else 100.0
        # a rising curve that ends at `final`; epoch 0 evaluated before training
        curve = {e: final * (0.7 + 0.3 * e / cfg.epochs) for e in range(cfg.epochs + 1)}
        for e, v in curve.items():
            stage = "init" if e == 0 else ("sft" if e <= cfg.sft_epochs else "dpo")
            self.store.record_epoch(h, stage, e, {key: v * scale, "train/loss": 1.0 / (e + 1)}, None if e == 0 else wall)
        rng = np.random.default_rng(cfg.seed + 100 * self.order)
        if cfg.task == "paraphrase":
            correct = np.arange(N_DEV) < round(final * N_DEV)  # deterministic: better runs are right on a superset
            outs = [(f"q{i}", r if c else str(1 - int(r)), r) for i, (r, c) in enumerate(zip(REFS, correct))]
            summary = {"dev/accuracy": final, "dev/macro_f1": final - 0.01, "dev/f1_positive": final - 0.02,
                       "best/dev/accuracy": final, "best/dev/macro_f1": final - 0.01, "best_epoch": cfg.epochs,
                       "init/dev/accuracy": 0.5, "init/dev/macro_f1": 0.4}
        else:
            outs = [(f"s{j}", t if rng.random() < final else t[::-1], t) for j, t in enumerate(TRUE_SONNETS)]
            summary = {"dev/chrf": final * scale, "dev/chrf_continuation": final * scale - 5,
                       "best/dev/chrf": final * scale, "best_epoch": cfg.epochs, "sonnet_source": "cs224n-sonnets",
                       "init/dev/chrf": 30.0, "init/dev/chrf_continuation": 12.0}
        lora = cfg.param == "lora"
        summary.update({"wall_clock_s": wall * cfg.epochs, "wall_clock_per_epoch_s": wall, "train_tokens_per_s": 5000.0,
                        "peak_memory_mb": 900.0 if lora else 1500.0, "trainable_params": 300_000 if lora else 124_000_000,
                        "total_params": 124_300_000 if lora else 124_000_000, "train_examples": int(1000 * cfg.data_fraction)})
        env = {"device": "NVIDIA H100", "git_commit": "abc123", "packages": {"torch": "2.13.0", "peft": "0.17.0"}}
        self.store.finish_run(h, summary, env, outs)
        return h


@pytest.fixture
def study(tmp_path):
    b = Builder(tmp_path)
    for seed, acc in zip((0, 1, 2), (0.90, 0.91, 0.92)):
        b.add(task="paraphrase", model="gpt2", regime="sft", param="fft", epochs=3, seed=seed, final=acc)
        b.add(task="paraphrase", model="gpt2", regime="sft-dpo", handoff_epoch=2, param="fft", epochs=3, seed=seed,
              final=acc + 0.005)
    for seed, acc in zip((0, 1), (0.85, 0.86)):
        b.add(task="paraphrase", model="gpt2", regime="sft", param="lora", lora_rank=8, epochs=3, seed=seed, final=acc, wall=9.0)
        b.add(task="paraphrase", model="gpt2", regime="dpo", param="fft", epochs=3, seed=seed, final=acc + 0.02)
        b.add(task="paraphrase", model="gpt2", regime="sft", param="fft", epochs=3, seed=seed, final=acc, wall=5.0,
              data_fraction=0.5)
    b.add(task="paraphrase", model="gpt2", regime="sft", param="lora", lora_rank=16, epochs=3, seed=5,
          status="failed", error="CUDA out of memory: tried to allocate 2.00 GiB")
    b.add(task="paraphrase", model="gpt2", regime="sft", param="lora", lora_rank=4, epochs=3, seed=0, status="pending")
    for seed in (0, 1):
        b.add(task="sonnet", model="smollm2-135m", regime="sft", param="fft", epochs=2, seed=seed, final=0.40 + seed / 100)
        b.add(task="sonnet", model="smollm2-135m", regime="sft-dpo", handoff_epoch=1, pairs="v1", param="fft", epochs=2,
              seed=seed, final=0.42)
        b.add(task="sonnet", model="smollm2-135m", regime="sft", param="lora", lora_rank=4, epochs=2, seed=seed, final=0.35)
    b.add(task="sonnet", model="smollm2-135m", regime="sft", param="fft", epochs=2, seed=0, final=0.38, temperature=0.7)
    return tmp_path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_report_tables_numbers_and_paper_column(study):
    report = write_report(study)
    md = report.read_text()
    assert report == study / "report" / "report.md"
    # Table A, FFT SFT cell: accuracies 90/91/92 -> 91.00 ± 1.00 over 3 seeds
    row = next(l for l in md.splitlines() if l.startswith("| gpt2 | SFT | FFT |"))
    assert "91.00 ± 1.00 [" in row and "(n=3)" in row
    assert "89.87 / 89.21" in row and "+1.13 / +0.79" in row  # macro-F1 mean 90.00 - 89.21
    lora = next(l for l in md.splitlines() if l.startswith("| gpt2 | SFT | LoRA r=8 |"))
    assert "85.50 ± 0.71" in lora and "87.70 / 87.00" in lora and "-2.20 / -2.50" in lora
    staged = next(l for l in md.splitlines() if l.startswith("| gpt2 | SFT@2→DPO | FFT |"))
    assert "| — | — |" in staged  # the paper's staged run is SFT@9→DPO: no reference for k=2
    # the baseline to beat: each backbone's untrained (epoch 0) metrics head its table
    untrained = next(l for l in md.splitlines() if l.startswith("| gpt2 | untrained (epoch 0) |"))
    assert "50.00 ± 0.00" in untrained and "40.00 ± 0.00" in untrained
    untrained = next(l for l in md.splitlines() if l.startswith("| smollm2-135m | untrained (epoch 0) |"))
    assert "30.00 ± 0.00" in untrained and "12.00 ± 0.00" in untrained
    # sonnets on another backbone: no paper comparison
    assert "n/a (backbone smollm2-135m, paper: gpt2)" in md
    lora_sonnet = next(l for l in md.splitlines() if l.startswith("| smollm2-135m | SFT | — | LoRA r=4 |"))
    assert "35.00 ± 0.00 [35.00, 35.00] (n=2)" in lora_sonnet
    # the temperature-0.7 run has one seed and sits in Table B2 only
    assert "Table B2" in md and "38.00 (n=1)" in md

    rows = read_csv(study / "report" / "table_a_paraphrase.csv")
    sft = next(r for r in rows if r["Regime"] == "SFT" and r["Param"] == "FFT")
    assert float(sft["Accuracy (%) mean"]) == pytest.approx(91.0) and sft["Accuracy (%) n"] == "3"
    assert float(sft["Accuracy (%) ci_lo"]) <= 91.0 <= float(sft["Accuracy (%) ci_hi"])
    tex = (study / "report" / "table_a_paraphrase.tex").read_text()
    assert r"\begin{tabular}" in tex and r"regime $\times$ parameterization" in tex and r"$\pm$" in tex and r"SFT@2$\rightarrow$DPO" in tex


def test_report_files_and_figures(study):
    write_report(study)
    out = study / "report"
    for slug in ("table_a_paraphrase", "table_b_sonnet", "table_b2_sonnet_temperature", "table_handoff",
                 "table_cost", "table_data_scale", "table_comparisons"):
        assert (out / f"{slug}.csv").stat().st_size > 0 and (out / f"{slug}.tex").stat().st_size > 0
    for task in ("paraphrase", "sonnet"):
        for fig in ("fig_handoff", "fig_fft_vs_lora"):
            data = (out / f"{fig}_{task}.png").read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 5000
            assert f"({fig}_{task}.png)" in (out / "report.md").read_text()


def test_runs_setup_and_cost_sections(study):
    md = write_report(study).read_text()
    assert "done: 19" in md and "failed: 1" in md and "pending: 1" in md
    assert "CUDA out of memory: tried to allocate 2.00 GiB" in md
    assert "cs224n-sonnets" in md and "gpt2 (" in md and "smollm2-135m (" in md
    assert "| device | NVIDIA H100 |" in md and "| packages.torch | 2.13.0 |" in md
    cost = read_csv(study / "report" / "table_cost.csv")
    lora = next(r for r in cost if r["Task"] == "paraphrase" and r["Param"] == "LoRA r=8")
    assert lora["Trainable params (% of total)"] == "300,000 (0.24%)"
    assert float(lora["Wall-clock / epoch (s) mean"]) == pytest.approx(9.0)


def test_data_scale_equal_time(study):
    write_report(study)
    rows = read_csv(study / "report" / "table_data_scale.csv")
    assert {r["Data fraction"] for r in rows} == {"0.5", "1"}
    full = next(r for r in rows if r["Data fraction"] == "1")
    half = next(r for r in rows if r["Data fraction"] == "0.5")
    # half data takes 3 x 5 s = 15 s; full data (10 s/epoch) fits 1 epoch into that budget
    assert full["Time budget T (s)"] == half["Time budget T (s)"] == "15.0"
    assert float(full["Epoch reached mean"]) == 1.0 and float(half["Epoch reached mean"]) == 3.0
    # full-data curve at epoch 1: final * (0.7 + 0.1), mean of 0.90/0.91/0.92 -> 91 * 0.8
    assert float(full["At equal time mean"]) == pytest.approx(91.0 * 0.8)
    assert float(full["At equal epochs mean"]) == pytest.approx(91.0)
    assert "equal time" in (study / "report" / "report.md").read_text().lower()


def test_key_comparisons(study):
    md = write_report(study).read_text()
    assert "The paper reports no significance tests" in md
    rows = read_csv(study / "report" / "table_comparisons.csv")
    labels = {(r["Task"], r["Comparison (A vs B)"], r["Metric"]) for r in rows}
    assert ("paraphrase", "FFT vs LoRA r=8 (SFT)", "accuracy (%)") in labels
    assert ("paraphrase", "SFT@2→DPO vs SFT (FFT)", "macro-F1 (%)") in labels
    assert ("paraphrase", "DPO-only vs SFT (FFT)", "accuracy (%)") in labels
    assert ("sonnet", "FFT vs LoRA r=4 (SFT)", "chrF") in labels
    fft_lora = next(r for r in rows if r["Comparison (A vs B)"] == "FFT vs LoRA r=8 (SFT)" and r["Metric"] == "accuracy (%)")
    # seeds 0 and 1 exist for both conditions: 2 x 200 pooled examples
    assert fft_lora["n examples"] == "400" and fft_lora["Seeds"] == "0,1"
    # FFT is right on a superset of LoRA's examples for every seed: 5 points better, never reversed
    assert float(fft_lora["Δ (A − B)"]) == pytest.approx(5.0) and float(fft_lora["p"]) < 0.01


def test_other_backbone_and_empty_sections(tmp_path):
    b = Builder(tmp_path)
    b.add(task="paraphrase", model="smollm2-135m", regime="sft", param="fft", epochs=2, seed=0, final=0.8)
    b.add(task="paraphrase", model="smollm2-135m", regime="sft", param="fft", epochs=2, seed=1, status="failed",
          error="boom")
    md = write_report(tmp_path).read_text()
    assert "80.00 (n=1)" in md
    assert "n/a (backbone smollm2-135m, paper: gpt2)" in md
    assert "No finished sonnet runs; Table B omitted." in md
    assert "data-scale table omitted" in md and "key comparisons omitted" in md
    assert not (tmp_path / "report" / "fig_fft_vs_lora_paraphrase.png").exists()
    assert (tmp_path / "report" / "fig_handoff_paraphrase.png").read_bytes().startswith(PNG_MAGIC)
    assert "| boom |" in md


def test_study_without_finished_runs(tmp_path):
    b = Builder(tmp_path)
    b.add(task="sonnet", regime="sft", seed=0, status="pending")
    md = write_report(tmp_path).read_text()
    assert "pending: 1" in md and "Table A omitted" in md and "Table B omitted" in md


def test_missing_database_is_a_user_error(tmp_path):
    with pytest.raises(SftdpoError, match="no study database"):
        write_report(tmp_path)


def test_paper_dict_holds_the_reference_numbers():
    assert PAPER["backbone"] == "gpt2"
    para = {(e["match"]["regime"], e["match"]["param"]): (e["dev/accuracy"], e["dev/macro_f1"]) for e in PAPER["paraphrase"]}
    assert para[("sft", "fft")] == (89.87, 89.21) and para[("sft-dpo", "fft")] == (90.05, 89.43)
    assert para[("sft", "lora")] == (87.70, 87.00)
    assert [e["dev/chrf"] for e in PAPER["sonnet"]] == [(41.29, 41.29), (41.5, 41.9)]


def test_gpt2_sonnet_paper_range(tmp_path):
    b = Builder(tmp_path)
    b.add(task="sonnet", model="gpt2", regime="sft-dpo", handoff_epoch=1, pairs="v1", epochs=2, seed=0, final=0.417)
    b.add(task="sonnet", model="gpt2", regime="sft-dpo", handoff_epoch=1, pairs="v2", epochs=2, seed=0, final=0.40)
    b.add(task="sonnet", model="gpt2", regime="sft", epochs=2, seed=0, final=0.40)
    md = write_report(tmp_path).read_text()
    v1 = next(l for l in md.splitlines() if l.startswith("| gpt2 | SFT@1→DPO | v1 |"))
    assert "| 41.5–41.9 | +0.00 (within range) |" in v1
    v2 = next(l for l in md.splitlines() if l.startswith("| gpt2 | SFT@1→DPO | v2 |"))
    assert v2.endswith("| — | — |")  # the paper's range is for v1 pairs only
    sft = next(l for l in md.splitlines() if l.startswith("| gpt2 | SFT | — |"))
    assert "| 41.29 | -1.29 |" in sft
