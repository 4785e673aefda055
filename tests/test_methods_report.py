"""The method comparison (issue 26 §3): the methods specs, run names per method and objective, the
report's method table (Δ against the FFT run of the same regime and objective) and cost-vs-quality
figure (one point per method at its trainable parameters and seconds per epoch)."""

from __future__ import annotations

import pytest
from test_report import Builder, _results

from sftdpo.config import RunConfig
from sftdpo.peft_methods import METHODS
from sftdpo.report import write_report
from sftdpo.report.methods import figure_methods, table_methods
from sftdpo.report.results import regime_label
from sftdpo.study.spec import expand, load_spec, name_runs

IA3 = {"trainable_params": 50_000, "total_params": 124_050_000}
FFT = {"trainable_params": 124_000_000, "total_params": 124_000_000}


@pytest.fixture
def methods_study(tmp_path):
    b = Builder(tmp_path)
    base = dict(task="paraphrase", model="gpt2", epochs=3)
    for seed, acc in ((0, 0.80), (1, 0.82)):
        b.add(**base, regime="sft", param="fft", seed=seed, final=acc, wall=10.0, summary_extra=FFT)
    for seed in (0, 1):
        b.add(**base, regime="sft", param="lora", lora_rank=8, seed=seed, final=0.78, wall=9.0)
        b.add(**base, regime="sft", param="ia3", seed=seed, final=0.70, wall=8.0, summary_extra=IA3)
        b.add(**base, regime="dpo", param="fft", seed=seed, final=0.75, wall=12.0, summary_extra=FFT)
        b.add(**base, regime="dpo", param="ia3", seed=seed, final=0.72, wall=7.0, summary_extra=IA3)
        b.add(**base, regime="dpo", param="fft", loss_type="ipo", seed=seed, final=0.76, wall=12.0, summary_extra=FFT)
        b.add(**base, regime="sft-dpo", handoff_epoch=2, objective="orpo", param="fft", seed=seed, final=0.79, wall=11.0,
              summary_extra=FFT)
    b.store.close()
    return tmp_path


def test_method_table_compares_each_method_with_fft_of_its_own_regime(methods_study):
    t = table_methods(_results(methods_study))
    assert t.rows[0][:3] == ["paraphrase", "untrained (epoch 0)", "gpt2"] and t.rows[0][3].mean == pytest.approx(50.0)
    assert t.reference_rows == 1  # not a candidate for "best"
    rows = {(r[1], r[2]): r for r in t.rows[1:]}
    col = {c: i for i, c in enumerate(t.columns)}
    assert rows[("SFT", "IA3")][col["Second metric"]].mean == pytest.approx(69.0)  # macro-F1 beside accuracy
    delta, metric, params = col["Δ vs FFT (same regime)"], col["Final dev metric"], col["Trainable params (% of total)"]
    assert rows[("SFT", "IA3")][metric].mean == pytest.approx(70.0)
    assert rows[("SFT", "FFT")][metric].mean == pytest.approx(81.0)
    # the reference is the FFT run of the same regime: 72 - 75 for DPO-only (not 72 - 81, SFT's FFT)
    assert rows[("SFT", "IA3")][delta] == "-11.00" and rows[("DPO-only", "IA3")][delta] == "-3.00"
    assert rows[("SFT", "LoRA r=8")][delta] == "-3.00"
    assert rows[("SFT", "FFT")][delta] == "" and rows[("DPO-only", "FFT")][delta] == ""
    assert rows[("SFT", "IA3")][params] == "50,000 (0.0403%)"
    # each preference objective is its own arm, named as the report names regimes
    assert ("DPO (ipo)-only", "FFT") in rows and ("SFT@2→ORPO", "FFT") in rows
    # best first within a regime
    sft = [r[2] for r in t.rows if r[1] == "SFT"]
    assert sft == ["FFT", "LoRA r=8", "IA3"]
    assert t.rows[[r[1] for r in t.rows].index("SFT")][col["Wall-clock / epoch (s)"]].mean == pytest.approx(10.0)


def test_method_figure_puts_each_method_at_its_parameters_and_seconds(methods_study):
    fig = figure_methods(_results(methods_study), "paraphrase")
    by_params, by_time = fig.axes[:2]

    def points(ax):  # the data markers (not the error bars' caps, marker "_")
        return sorted((float(ln.get_xdata()[0]), round(float(ln.get_ydata()[0]), 6)) for ln in ax.lines
                      if len(ln.get_xdata()) == 1 and ln.get_marker() != "_")

    # the regimes that compare methods (SFT, DPO-only); IPO and ORPO ran on FFT alone: left to the table
    assert points(by_params) == sorted([(124e6, 81.0), (300_000.0, 78.0), (50_000.0, 70.0), (124e6, 75.0),
                                        (50_000.0, 72.0)])
    assert points(by_time) == sorted([(10.0, 81.0), (9.0, 78.0), (8.0, 70.0), (12.0, 75.0), (7.0, 72.0)])
    assert by_params.get_xscale() == "log"
    # FFT of each regime as a horizontal line at its mean, the untrained model's too
    flat = {round(float(ln.get_ydata()[0]), 6) for ln in by_params.lines if len(ln.get_xdata()) == 2}
    assert flat == {81.0, 75.0, 50.0}


def test_report_has_the_method_section_only_for_a_method_study(methods_study, tmp_path):
    md = write_report(methods_study).read_text()
    assert "## Method comparison" in md and (methods_study / "report" / "fig_methods_paraphrase.png").exists()
    b = Builder(tmp_path / "plain")
    for param in ("fft", "lora"):
        b.add(task="paraphrase", model="gpt2", epochs=3, regime="sft", param=param, lora_rank=8, seed=0, final=0.8)
    b.store.close()
    assert table_methods(_results(tmp_path / "plain")) is None
    assert "Method comparison" not in write_report(tmp_path / "plain").read_text()


def test_regime_labels_name_the_preference_objective():
    assert regime_label({"regime": "sft-dpo", "handoff_epoch": 1}) == "SFT@1→DPO"
    assert regime_label({"regime": "dpo", "objective": "dpo", "loss_type": "sigmoid"}) == "DPO-only"
    assert regime_label({"regime": "dpo", "objective": "kto"}) == "KTO-only"
    assert regime_label({"regime": "sft-dpo", "handoff_epoch": 3, "objective": "simpo"}) == "SFT@3→SimPO"
    assert regime_label({"regime": "dpo", "loss_type": "sigmoid,bco_pair,sft", "loss_weights": [0.8, 0.2, 1.0]}) == \
        "DPO (sigmoid,bco_pair,sft × 0.8/0.2/1)-only"


def test_run_names_say_the_method_and_the_objective():
    cfgs = [RunConfig(task="paraphrase", param="ia3"), RunConfig(task="paraphrase", param="dora"),
            RunConfig(task="paraphrase", param="lora-plus"), RunConfig(task="paraphrase", param="lora"),
            RunConfig(task="paraphrase", epochs=2, regime="sft-dpo", handoff_epoch=1, objective="orpo"),
            RunConfig(task="paraphrase", epochs=2, regime="sft-dpo", handoff_epoch=1),
            RunConfig(task="paraphrase", regime="dpo", objective="kto")]
    names = [n.rsplit("-s0-", 1)[0] for n, _ in name_runs(cfgs)]
    assert names == ["paraphrase-sft-ia3", "paraphrase-sft-dora8", "paraphrase-sft-loraplus8", "paraphrase-sft-lora8",
                     "paraphrase-sft1-orpo-fft", "paraphrase-sft1-dpo-fft", "paraphrase-kto-fft"]


def _runs(spec: str) -> list[RunConfig]:
    return [c for _, c in expand(load_spec(spec))]


def test_methods_quick_runs_every_method_in_every_regime_and_the_objectives_on_fft():
    runs = _runs("methods-quick")
    para = [c for c in runs if c.task == "paraphrase"]
    methods = {"fft", "lora", "dora", "rslora", "pissa", "ia3", "vera", "prefix", "ln"}
    for regime in ("sft", "dpo", "sft-dpo"):
        assert {c.param for c in para if c.regime == regime and c.objective == "dpo" and c.loss_type == "sigmoid"} == methods
    arms = {(c.regime, c.objective, c.loss_type) for c in para if c.regime != "sft"}
    assert {(o, lt) for _, o, lt in arms} == {("dpo", "sigmoid"), ("dpo", "ipo"), ("dpo", "sigmoid,bco_pair,sft"),
                                             ("simpo", "sigmoid"), ("orpo", "sigmoid"), ("kto", "sigmoid")}
    assert all(c.param == "fft" for c in para if (c.objective, c.loss_type) != ("dpo", "sigmoid"))
    assert {c.param for c in runs if c.task == "sonnet"} == methods and {c.regime for c in runs if c.task == "sonnet"} == {"sft"}
    # the stated learning-rate rule: 5 x PEFT's method-comparison rate; the preference stage at half of it
    for c in para:
        if c.regime != "dpo":
            assert c.lr == pytest.approx(5 * METHODS[c.param].lr), c.param
        if c.regime != "sft":
            assert c.dpo_lr == pytest.approx(5 * METHODS[c.param].lr / 2), c.param


def test_methods_spec_follows_peft_rates_relative_to_lora():
    runs = _runs("methods")
    assert {c.param for c in runs} == {"fft", "lora", "dora", "rslora", "pissa", "ia3", "vera", "prefix", "bitfit"}
    paper = {"paraphrase": (2e-5, 5e-4), "sonnet": (1e-5, 3e-4)}  # the paper spec's FFT and LoRA rates

    def rate(c: RunConfig) -> float:
        fft, lora = paper[c.task]
        return fft if c.param == "fft" else lora * METHODS[c.param].lr / METHODS["lora"].lr

    for c in runs:
        assert c.epochs == 10 and (c.regime != "sft-dpo" or c.handoff_epoch == 5)
        if c.regime != "dpo":
            assert c.lr == pytest.approx(rate(c)), c.param
        if c.regime != "sft":
            assert c.dpo_lr == pytest.approx(rate(c) / 10), c.param
