"""The paper's claims as pre-registered comparisons (report/claims.py, stats.claim_test): parsing and
run matching, the cluster bootstrap over dev examples and the t-test over seeds against hand
computations and scipy/statsmodels/sacreBLEU, Holm, TOST verdicts, the detectable effect against
simulation, the report's Claims section and the dry-run's assumed detectable effects."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from sftdpo.cli import main
from sftdpo.config import RunConfig, SftdpoError
from sftdpo.report import write_report
from sftdpo.report.claims import (ASSUME, Claim, N_BOOT, assumed_mde, comparisons, evaluate_study, parse_claim,
                                  parse_claims, plan_lines)
from sftdpo.report.results import StudyResults
from sftdpo.stats import claim_test, corpus_chrf, mde_normal, mde_t, normal_p, seeds_bootstrap
from sftdpo.store import Store

N = 400  # dev examples of the synthetic paraphrase runs
REFS = [str(x) for x in np.random.default_rng(0).integers(0, 2, N)]
CPU = "cpu (Intel(R) Xeon(R) Processor, 2 cores)"


def outputs(correct: np.ndarray, refs: list[str] = REFS) -> list[tuple[str, str, str]]:
    """Dev outputs that are right exactly where `correct` is."""
    return [(f"q{i}", r if c else str(1 - int(r)), r) for i, (r, c) in enumerate(zip(refs, correct))]


def right_on(k: int, start: int = 0, n: int = N) -> np.ndarray:
    """Right on k examples, starting at `start` (wrapping): runs differ on chosen examples."""
    c = np.zeros(n, dtype=bool)
    c[(start + np.arange(k)) % n] = True
    return c


class Study:
    """A study directory with study.db written through Store, as a finished study leaves it."""

    def __init__(self, root: Path, claims: object = None):
        self.root = root
        self.store = Store(root / "study.db")
        self.order = 0
        if claims is not None:
            (root / "spec.yaml").write_text(yaml.safe_dump({"name": "synthetic", "claims": claims}))

    def add(self, outs=None, device: str = CPU, summary: dict | None = None, **kw) -> str:
        cfg = RunConfig(**kw).validate().normalised()
        h = cfg.hash()
        self.store.add_run(h, f"run{self.order}", cfg.to_dict(), f"runs/{h}", self.order)
        self.order += 1
        self.store.set_status(h, "running")
        s = {"device": device, "wall_clock_per_epoch_s": 10.0}
        if outs is not None and cfg.task == "paraphrase":
            s["dev/accuracy"] = float(np.mean([p == r for _, p, r in outs]))
        elif outs is not None:
            s["dev/chrf"] = corpus_chrf([p for _, p, _ in outs], [r for _, _, r in outs])
        s.update(summary or {})
        self.store.finish_run(h, s, {"device": device}, outs or [])
        return h

    def results(self) -> StudyResults:
        return StudyResults(self.store)


def claim(**kw) -> Claim:
    d = {"says": "A beats B", "a": {"param": "fft"}, "b": {"param": "lora"}, "vary": ["lora_rank", "lr"],
         "metric": {"paraphrase": "accuracy", "sonnet": "chrf"}, "kind": "greater", **kw}
    return parse_claim("test-claim", d, "test")


PARA = dict(task="paraphrase", model="gpt2", epochs=2)


# -- parsing ----------------------------------------------------------------------------------------

def test_shipped_paper_claims_parse_and_cite_report_paper_numbers():
    """The paper's claims are defined once (specs/claims/paper.yaml) and quote report/paper.py's numbers:
    catches a claims file that drifts from the specs that declare it, a claim typed with a field that
    no run has, and a paper number written twice (or invented) instead of looked up."""
    from sftdpo.report.claims import _paper_text
    from sftdpo.study.spec import load_spec

    cs = parse_claims("paper", "test")
    assert [c.number for c in cs.claims] == ["1", "2", "3", "4a", "4b", "5", "6"]
    by = {c.number: c for c in cs.claims}
    assert _paper_text(by["1"]) == "paraphrase accuracy (%): FFT SFT 89.87 vs LoRA r=8 SFT 87.70 (Δ +2.17)"
    assert "SFT@9→DPO 90.05 vs FFT SFT 89.87 (Δ +0.18)" in _paper_text(by["2"])
    assert "41.5–41.9 vs FFT SFT 41.29 (Δ +0.21 to +0.61)" in _paper_text(by["2"])
    assert _paper_text(by["3"]) == _paper_text(by["5"]) == _paper_text(by["6"]) == "not reported"
    assert by["3"].kind == "equivalent" and by["3"].margin == 1.5
    assert by["5"].ratio and by["5"].pool == ("device",) and by["6"].more == "data_fraction"
    assert {"budget_steps"} <= set(by["6"].a)
    for spec in ("quick", "paper"):
        assert load_spec(spec)["claims"] in ("paper", {"from": "paper", "where": {"data_fraction": 1.0}})
        parse_claims(load_spec(spec)["claims"], spec)


@pytest.mark.parametrize("change,words", [
    ({"a": {"param": "fft", "lora_rnk": 4}}, "`a` names lora_rnk, which is not a config field"),
    ({"vary": ["lr", "learning_rate"]}, "`vary` names learning_rate"),
    ({"kind": "better"}, "`kind` must be one of greater, no-greater-than, no-less-than, equivalent"),
    ({"kind": "equivalent"}, "`kind: equivalent` needs a `margin` > 0"),
    ({"metric": {"paraphrase": "acc"}}, "`metric` 'acc' (for paraphrase) is not one of"),
    ({"effect": "ratio"}, "`effect: ratio` is for positive summary values"),
    ({"more": "model"}, "`more` must name a numeric config field"),
    ({"b": {"param": "fft"}, "vary": []}, "`a` and `b` select the same conditions"),
    ({"margin": -1}, "`margin` must be a number >= 0"),
    ({"a": {"lora_rank": "eight"}}, "`a.lora_rank`: invalid config: lora_rank must be an integer"),
    ({"paper": [{"task": "paraphrase", "a": {"regime": "dpo", "param": "fft"}, "b": {"regime": "sft", "param": "fft"}}]},
     "paper[0].a {'regime': 'dpo', 'param': 'fft'} matches no number of report/paper.py"),
    ({"speaks": "x"}, "unknown key(s) speaks"),
])
def test_bad_claims_are_one_line_errors_naming_the_claim_and_field(change, words):
    """Each mistake in a claim is one line naming the spec, the claim and the field: catches claims whose
    typo'd field silently matches no run (a claim never tested reads like one that was), and errors
    that do not say where to look."""
    d = {"says": "A beats B", "a": {"param": "fft"}, "b": {"param": "lora"}, "vary": ["lora_rank", "lr"],
         "metric": {"paraphrase": "accuracy"}, "kind": "greater", **change}
    with pytest.raises(SftdpoError) as e:
        parse_claims({"define": {"my-claim": d}}, "study spec s")
    msg = str(e.value)
    assert msg.startswith("study spec s: claim my-claim: ") and words in msg and "\n" not in msg


def test_spec_claims_errors_come_through_the_cli(tmp_path, cache, capsys, monkeypatch):
    """A spec with a bad claim stops `study run --dry-run` before anything runs, with `sftdpo: error:` and
    exit 2; `skip` of an unknown claim and a partial `define` of an inherited one are checked too: catches
    a spec key that is accepted but ignored, and a dry-run that prints its plan from a broken spec."""
    spec = yaml.safe_load((Path(__file__).parents[1] / "src/sftdpo/specs/quick.yaml").read_text())
    spec["name"], spec["claims"] = "s", {"from": "paper", "skip": ["fft-beats-lora", "no-such-claim"]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", str(path), "--dry-run", "--no-probe"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sftdpo: error: study spec s: `claims.skip` names no-such-claim, which is not a claim "
        "(fft-beats-lora, dpo-after-sft-gains, dpo-only-matches-sft, sonnet-v1-pairs-help, "
        "sonnet-v3-pairs-do-not-help, lora-not-faster, diversity-beats-repetition)")
    cs = parse_claims({"from": "paper", "define": {"dpo-only-matches-sft": {"margin": 2.0}},
                       "where": {"data_fraction": 1.0, "temperature": 1.0}}, "s")
    by = {c.name: c for c in cs.claims}
    assert by["dpo-only-matches-sft"].margin == 2.0 and by["dpo-only-matches-sft"].kind == "equivalent"
    # a spec-wide `where` narrows each claim on the fields it does not compare: not claim 6's data_fraction
    assert "data_fraction" in by["fft-beats-lora"].where and "data_fraction" not in by["diversity-beats-repetition"].where


# -- matching ----------------------------------------------------------------------------------------

def test_fft_vs_lora_pairs_runs_at_matched_depth_by_seed(tmp_path):
    """FFT vs LoRA pairs conditions that differ only in the parameterization, its LoRA options and its own
    learning rate, at the same epochs and regime, run by run on the same seed: catches pairing that ignores
    the depth (epochs), one that demands equal learning rates (no pairs at all), pairs across seeds, and a
    LoRA rank left out."""
    st = Study(tmp_path)
    for seed in (0, 1, 2):
        for epochs in (2, 3):
            st.add(outputs(right_on(300)), **{**PARA, "epochs": epochs}, param="fft", lr=2e-5, seed=seed)
            for rank in (4, 8):
                st.add(outputs(right_on(280)), **{**PARA, "epochs": epochs}, param="lora", lora_rank=rank, lr=5e-4, seed=seed)
        st.add(outputs(right_on(250)), **PARA, regime="sft-dpo", handoff_epoch=1, param="lora", lr=5e-4, seed=seed)
    st.add(outputs(right_on(250)), **PARA, param="lora", lr=5e-4, seed=7)  # no FFT run on seed 7
    comps = comparisons(claim(), st.results().conditions)
    assert sorted((c.pairs[0][0]["config"]["epochs"], c.pairs[0][1]["config"]["lora_rank"]) for c in comps) == [
        (2, 4), (2, 8), (3, 4), (3, 8)]
    for c in comps:
        assert [(a["config"]["seed"], b["config"]["seed"]) for a, b in c.pairs] == [(0, 0), (1, 1), (2, 2)]
        assert all(a["config"]["epochs"] == b["config"]["epochs"] and a["config"]["param"] == "fft" for a, b in c.pairs)
    assert {c.label for c in comps} == {"FFT vs LoRA r=4 (SFT)", "FFT vs LoRA r=8 (SFT)"}


def test_more_where_and_pooling_by_device(tmp_path):
    """`more` orders the sides by a field (A the larger data fraction), `where` narrows both, and `pool`
    groups every pair of runs by the device it ran on, dropping a pair run on two machines: catches a
    comparison of 10% against itself or in the wrong direction, and wall-clock ratios across machines."""
    st = Study(tmp_path)
    for seed in (0, 1, 2):
        for frac in (0.1, 0.5, 1.0):
            st.add(outputs(right_on(int(300 * frac) + 50)), **PARA, data_fraction=frac, seed=seed)
        st.add(outputs(right_on(200)), **PARA, data_fraction=0.5, seed=seed, lr=1e-4)
    c6 = claim(a={}, b={}, vary=[], more="data_fraction", where={"lr": 5e-5})
    comps = comparisons(c6, st.results().conditions)
    assert sorted((c.pairs[0][0]["config"]["data_fraction"], c.pairs[0][1]["config"]["data_fraction"])
                  for c in comps) == [(0.5, 0.1), (1.0, 0.1), (1.0, 0.5)]
    st2 = Study(tmp_path / "b")
    for seed in (0, 1, 2, 3):
        st2.add(outputs(right_on(300)), **PARA, param="fft", seed=seed, device="gpu A" if seed < 3 else CPU)
        st2.add(outputs(right_on(300)), **PARA, param="lora", lr=5e-4, seed=seed, device="gpu A" if seed in (0, 2) else CPU)
        st2.add(outputs(right_on(300)), **{**PARA, "epochs": 3}, param="fft", seed=seed, device=CPU)
        st2.add(outputs(right_on(300)), **{**PARA, "epochs": 3}, param="lora", lr=5e-4, seed=seed, device=CPU)
    c5 = claim(a={"param": "lora"}, b={"param": "fft"}, metric="wall_clock_per_epoch_s", effect="ratio",
               kind="no-less-than", margin=0.1, pool=["device"])
    comps = {c.device: c for c in comparisons(c5, st2.results().conditions)}
    assert set(comps) == {"gpu A", CPU}
    assert sorted(a["config"]["seed"] for a, _ in comps["gpu A"].pairs) == [0, 2]  # seed 1: LoRA ran on the CPU
    assert len(comps[CPU].pairs) == 5  # seed 3 at 2 epochs, seeds 0-3 at 3 epochs
    assert all(comp.task == "all tasks" for comp in comps.values())


def test_data_scale_claim_pairs_fractions_at_one_step_budget(tmp_path):
    """Claim 6 (shipped) compares the larger data fraction with the smaller at the same --budget-steps,
    seed by seed: catches epoch-matched runs (100x more steps on the full data) counted as evidence, and
    runs of different budgets paired."""
    st = Study(tmp_path)
    for seed in (0, 1, 2):
        for frac in (0.1, 1.0):
            st.add(outputs(right_on(300 if frac == 1 else 280)), **PARA, data_fraction=frac, budget_steps=100, seed=seed)
            st.add(outputs(right_on(300 if frac == 1 else 260)), **PARA, data_fraction=frac, seed=seed)  # epochs
        st.add(outputs(right_on(310)), **PARA, data_fraction=1.0, budget_steps=200, seed=seed)
    c6 = next(c for c in parse_claims("paper", "t").claims if c.number == "6")
    [comp] = comparisons(c6, st.results().conditions)
    assert [(a["config"]["data_fraction"], b["config"]["data_fraction"], a["config"]["budget_steps"],
             b["config"]["budget_steps"], a["config"]["seed"] == b["config"]["seed"]) for a, b in comp.pairs] == [
        (1.0, 0.1, 100, 100, True)] * 3
    assert comp.label == "data_fraction=1 vs data_fraction=0.1 (SFT, FFT, budget 100)"


# -- statistics on synthetic stores --------------------------------------------------------------------

def test_effect_and_cluster_bootstrap_against_hand_computation(tmp_path):
    """Three seeds whose A runs are right on 40-48 more examples, overlapping between seeds: the effect is the mean of the
    per-seed accuracy differences (hand-computed), the bootstrap standard error that of one resample of
    examples shared by the seeds, sqrt(var(e) / n) with e the per-example difference averaged over seeds,
    and the seeds' p-value scipy's paired t-test. Catches seeds pooled as if independent (a bootstrap per
    seed or over the pooled examples: 26% too small here), an unpaired comparison, effects not
    averaged over seeds, and a one-sided p where the test is two-sided."""
    st = Study(tmp_path)
    acc_a, acc_b = [], []
    for seed, base in zip((0, 1, 2), (220, 240, 250)):
        st.add(outputs(right_on(base)), **PARA, param="lora", lr=5e-4, seed=seed)
        extra = right_on(base) | right_on(40 + seed * 4, start=base)  # 40-48 more right, the same examples first
        st.add(outputs(extra), **PARA, param="fft", seed=seed)
        acc_a.append(extra.mean() * 100)
        acc_b.append(base / N * 100)
    [comp] = comparisons(claim(), st.results().conditions)
    [o] = evaluate_study(parse_claims({"define": {"c": {
        "says": "x", "a": {"param": "fft"}, "b": {"param": "lora"}, "vary": ["lora_rank", "lr"],
        "metric": "accuracy", "kind": "greater"}}}, "t"), st.results())
    [res] = o.results
    t = res.test
    d = np.array(acc_a) - np.array(acc_b)
    assert t["effect"] == pytest.approx(d.mean(), abs=1e-9) and res.a == pytest.approx(acc_a)
    # per-example difference averaged over the seeds: 1 on the first 40, then 2/3, 1/3 over the next 4s
    e = np.zeros(N)
    for seed, base in zip((0, 1, 2), (220, 240, 250)):
        e += (right_on(base) | right_on(40 + seed * 4, start=base)).astype(float) - right_on(base)
    e *= 100 / 3
    se = math.sqrt(e.var() / N)
    boot_se = (res.ci_examples[1] - res.ci_examples[0]) / (2 * 1.959963984540054)
    assert boot_se == pytest.approx(se, rel=0.05)  # 2000 resamples: the se's own sd is ~1.6%
    assert t["p_sources"]["examples"] == pytest.approx(2 * sps.norm.sf(t["effect"] / boot_se), rel=1e-9)
    assert t["p_sources"]["seeds"] == pytest.approx(sps.ttest_rel(acc_a, acc_b).pvalue, rel=1e-9)
    assert t["p"] == max(t["p_sources"].values()) and t["decides"]
    assert o.p == t["p"] and o.p_holm == t["p"]  # one claim, one comparison: nothing to adjust
    assert comp.label == "FFT vs LoRA r=8 (SFT)"


def test_chrf_effect_is_sacrebleu_corpus_chrf_per_seed(tmp_path):
    """chrF is a corpus statistic: each seed's value is sacreBLEU's corpus chrF of its outputs (not a
    mean of sentence scores), the effect the mean over seeds of the differences; catches a mean over
    examples and a pooled corpus over seeds."""
    refs = [f"Shall I compare thee to a summer's day, line {i}? Thou art more lovely" for i in range(30)]
    st = Study(tmp_path)
    rng = np.random.default_rng(1)
    diffs = []
    for seed in (0, 1, 2):
        good = [r if rng.random() < 0.7 else r[::-1] for r in refs]
        bad = [r if rng.random() < 0.4 else r[::-1] for r in refs]
        st.add([(f"s{i}", g, r) for i, (g, r) in enumerate(zip(good, refs))], task="sonnet", model="gpt2", epochs=2,
               param="fft", seed=seed)
        st.add([(f"s{i}", b, r) for i, (b, r) in enumerate(zip(bad, refs))], task="sonnet", model="gpt2", epochs=2,
               param="lora", lr=5e-4, seed=seed)
        diffs.append(corpus_chrf(good, refs) - corpus_chrf(bad, refs))
    [o] = evaluate_study(parse_claims({"define": {"c": {
        "says": "x", "a": {"param": "fft"}, "b": {"param": "lora"}, "vary": ["lora_rank", "lr"],
        "metric": "chrf", "kind": "greater"}}}, "t"), st.results())
    [res] = o.results
    assert res.test["effect"] == pytest.approx(np.mean(diffs), abs=1e-9)
    assert res.test["p_sources"]["seeds"] == pytest.approx(sps.ttest_1samp(diffs, 0).pvalue, rel=1e-9)


def test_holm_across_claims_matches_statsmodels(tmp_path):
    """Holm's adjustment runs across the claims, one p each (a directional claim's two-sided p, an
    equivalence claim's smaller of TOST and its contrary), in the report's order: catches no adjustment,
    Bonferroni, and a family of every comparison instead of every claim."""
    st = Study(tmp_path)
    for seed, (a, b, c) in enumerate([(300, 290, 295), (310, 290, 301), (305, 291, 290), (296, 292, 300)]):
        st.add(outputs(right_on(a)), **PARA, param="fft", seed=seed)
        st.add(outputs(right_on(b)), **PARA, param="lora", lr=5e-4, seed=seed)
        st.add(outputs(right_on(c)), **PARA, regime="dpo", param="fft", seed=seed)
        st.add(outputs(right_on(c - 3)), **PARA, regime="dpo", param="lora", lr=5e-4, seed=seed)
    cs = parse_claims({"define": {
        "c1": {"says": "x", "a": {"param": "fft"}, "b": {"param": "lora"}, "vary": ["lora_rank", "lr"],
               "metric": "accuracy", "kind": "greater"},
        "c3": {"says": "y", "a": {"regime": "dpo"}, "b": {"regime": "sft"}, "vary": ["lr"],
               "metric": "accuracy", "kind": "equivalent", "margin": 1.5}}}, "t")
    o1, o3 = evaluate_study(cs, st.results())
    assert len(o1.results) == 2 and len(o3.results) == 2  # SFT and DPO-only; FFT and LoRA
    t3 = [r.test for r in o3.results]
    assert o3.p == pytest.approx(min(max(t["p_support"] for t in t3), 2 * min(t["p_contradict"] for t in t3)))
    assert [o1.p_holm, o3.p_holm] == pytest.approx(multipletests([o1.p, o3.p], method="holm")[1], rel=1e-12)


def test_a_claim_is_supported_only_when_every_comparison_supports():
    """A claim's p over its comparisons: supported needs each one (the largest one-sided p, doubled as a
    two-sided test's), contradicted needs one (the smallest, times the deciding comparisons), a comparison
    that cannot decide counts against support. Catches "any comparison supports" (a union where the claim
    is universal) and a contradiction read off many comparisons without adjustment."""
    from sftdpo.stats import claim_p

    strong = claim_test("greater", 0.0, 2.0, [1.9, 2.1, 2.0, 2.2])
    weak = claim_test("greater", 0.0, 0.5, [0.1, 0.9, -0.2, 1.2])
    against = claim_test("greater", 0.0, -1.0, [-0.9, -1.1, -1.0, -1.2])
    one_seed = claim_test("greater", 0.0, 3.0, [3.0])
    p, way = claim_p([strong, weak])
    assert way == "supported" and p == pytest.approx(2 * weak["p_support"]) and p > 2 * strong["p_support"]
    p, way = claim_p([strong, against])
    assert way == "contradicted" and p == pytest.approx(2 * 2 * against["p_contradict"])
    assert claim_p([strong, one_seed])[0] == 1.0  # the one-seed comparison cannot support: nor can the claim
    assert claim_p([one_seed]) is None


@pytest.mark.parametrize("shift,noise,verdict", [(0.25, 0.3, "supported"), (4.0, 0.3, "contradicted"),
                                                  (0.0, 6.0, "undecided")])
def test_tost_equivalence_verdicts(tmp_path, shift, noise, verdict):
    """DPO-only vs SFT within ±1.5 points (TOST): a 0.25-point difference on 4,000 dev pairs and 5 seeds is
    shown equivalent, a 4-point one is shown outside the margin, seeds swinging ±6 points decide nothing.
    The seeds' TOST p is statsmodels' ttost_paired. Catches a TOST that tests only one side, a verdict from
    a plain significance test (not different = equivalent), and a contradiction called without evidence."""
    n = 4000
    refs = [str(x) for x in np.random.default_rng(3).integers(0, 2, n)]
    st = Study(tmp_path)
    a_acc, b_acc = [], []
    for seed in range(5):
        k_b = 3000 + 37 * seed
        k_a = k_b + int(round((shift + noise * (-1) ** seed) * n / 100))
        st.add(outputs(right_on(k_a, n=n), refs), **PARA, regime="dpo", seed=seed)
        st.add(outputs(right_on(k_b, n=n), refs), **PARA, regime="sft", seed=seed)
        a_acc.append(k_a / n * 100)
        b_acc.append(k_b / n * 100)
    cs = parse_claims({"define": {"c3": {"says": "y", "a": {"regime": "dpo"}, "b": {"regime": "sft"}, "vary": ["lr"],
                                         "metric": "accuracy", "kind": "equivalent", "margin": 1.5}}}, "t")
    [o] = evaluate_study(cs, st.results())
    [res] = o.results
    assert o.verdict == verdict
    assert res.test["p_sources"]["seeds"] == pytest.approx(ttost_paired(np.array(a_acc), np.array(b_acc), -1.5, 1.5)[0],
                                                           rel=1e-9)


def test_claim_test_kinds_and_wall_clock_ratio(tmp_path):
    """The ratio LoRA/FFT of wall-clock per epoch is the geometric mean over paired runs, tested as a
    t-test of the log-ratios against log(1 - margin) (no-less-than): catches an arithmetic mean of
    ratios, a difference in seconds, and the margin applied on the wrong side."""
    st = Study(tmp_path)
    ratios = [1.02, 0.97, 1.05, 1.0]
    for seed, r in enumerate(ratios):
        st.add(outputs(right_on(300)), **PARA, param="fft", seed=seed, summary={"wall_clock_per_epoch_s": 20.0})
        st.add(outputs(right_on(290)), **PARA, param="lora", lr=5e-4, seed=seed,
               summary={"wall_clock_per_epoch_s": 20.0 * r})
    cs = parse_claims({"define": {"c5": {"says": "z", "a": {"param": "lora"}, "b": {"param": "fft"},
                                         "vary": ["lora_rank", "lr"], "metric": "wall_clock_per_epoch_s",
                                         "effect": "ratio", "kind": "no-less-than", "margin": 0.1, "pool": ["device"]}}}, "t")
    [o] = evaluate_study(cs, st.results())
    [res] = o.results
    logs = np.log(ratios)
    assert math.exp(res.test["effect"]) == pytest.approx(np.exp(logs.mean()))
    assert res.test["p"] == pytest.approx(sps.ttest_1samp(logs, math.log(0.9)).pvalue, rel=1e-9)
    assert o.verdict == "supported"
    # the directional kinds against their points, on one set of per-pair effects
    eff = [1.0, 1.4, 0.8, 1.2]
    for kind, margin, point in (("greater", 0.0, 0.0), ("no-greater-than", 0.5, 0.5), ("no-less-than", 0.5, -0.5)):
        t = claim_test(kind, margin, float(np.mean(eff)), eff)
        assert t["p"] == pytest.approx(sps.ttest_1samp(eff, point).pvalue, rel=1e-12) and t["point"] == point


# -- detectable effects ------------------------------------------------------------------------------

def test_t_detectable_effect_is_statsmodels_power_and_tost_by_simulation():
    """mde_t: the two-sided t-test's 80%-power effect equals statsmodels' power solver (exact noncentral t,
    not the normal approximation that is 5% optimistic at three seeds); TOST's smallest margin rejects
    80% of simulated equivalent studies (40,000, seeded: binomial sd 0.002). Catches z for t, a one-sided
    level, and power at the wrong effect."""
    for n in (3, 4, 5, 10, 30):
        assert mde_t(1.0, n) == pytest.approx(TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8), rel=1e-5)
    rng = np.random.default_rng(0)
    for n in (3, 5):
        margin = mde_t(1.0, n, equivalence=True)
        x = rng.normal(0.0, 1.0, (40_000, n))
        m, se = x.mean(axis=1), x.std(axis=1, ddof=1) / math.sqrt(n)
        p = np.maximum(sps.t.sf((m + margin) / se, n - 1), sps.t.cdf((m - margin) / se, n - 1))
        assert (p < 0.05).mean() == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize("seeds", [1, 2])
def test_bootstrap_detectable_effect_by_simulation(seeds):
    """Simulated paired accuracy outcomes (dev-pair discordance 0.2, 300 pairs, 1 or 2 seeds) with a true
    effect equal to the dry-run's assumed detectable effect are rejected by the claims' own test (the
    cluster bootstrap's z-test, two-sided 0.05) in ~80% of 400 seeded studies (binomial sd 0.02; a
    one-sided detectable effect would give ~70%, a 50%-power one 50%). Catches a one-sided or 50%-power
    formula and a standard error that does not shrink with the seeds."""
    n, disc, sims = 300, 0.2, 400
    c = parse_claim("c", {"says": "x", "a": {"param": "fft"}, "b": {"param": "lora"}, "metric": "accuracy",
                          "kind": "greater"}, "t")
    mde, exact = assumed_mde(c, "accuracy", n, seeds, {**ASSUME, "discordance": disc})
    assert not exact  # fewer than 3 seeds: examples only
    delta = mde / 100
    rng = np.random.default_rng(seeds)
    rejected = 0
    for _ in range(sims):
        pairs = []
        for _ in range(seeds):
            u = rng.random(n)  # A right / B wrong with (disc + delta) / 2, the reverse with (disc - delta) / 2
            a_right = np.where(u < (disc + delta) / 2, True, np.where(u < disc, False, rng.random(n) < 0.5))
            b_right = np.where(u < disc, ~a_right, a_right)
            pairs.append(([(str(i), "1" if r else "0", "1") for i, r in enumerate(a_right)],
                          [(str(i), "1" if r else "0", "1") for i, r in enumerate(b_right)]))
        boot = seeds_bootstrap(pairs, "accuracy", n_boot=300, seed=int(rng.integers(1 << 30)))
        rejected += normal_p(boot["effect"], boot["se"], 0.0, "two-sided") < 0.05
    assert rejected / sims == pytest.approx(0.8, abs=0.06)


def test_observed_detectable_effect_matches_the_assumed_one(tmp_path):
    """On a study whose runs disagree on 20% of 1,000 pairs, the report's detectable effect (from the
    observed bootstrap variance) is the one the dry-run assumes for discordance 0.2: the two use the same
    arithmetic; catches a dry-run that reads the dev size or the seeds wrong."""
    n = 1000
    refs = ["1"] * n
    st = Study(tmp_path)
    rng = np.random.default_rng(5)
    for seed in range(3):
        flips = rng.permutation(n)[:200]
        a = np.ones(n, dtype=bool)
        a[flips[:100]] = False  # A wrong on 100, B wrong on the other 100: discordance 0.2, effect 0
        b = np.ones(n, dtype=bool)
        b[flips[100:]] = False
        st.add(outputs(a, refs), **PARA, param="fft", seed=seed)
        st.add(outputs(b, refs), **PARA, param="lora", lr=5e-4, seed=seed)
    [o] = evaluate_study(parse_claims({"define": {"c": {
        "says": "x", "a": {"param": "fft"}, "b": {"param": "lora"}, "vary": ["lora_rank", "lr"],
        "metric": "accuracy", "kind": "greater"}}}, "t"), st.results())
    c, [res] = o.claim, o.results
    boot_assumed = mde_normal(math.sqrt(0.2 * 100 ** 2 / (3 * n)))
    assert res.test["mde_sources"]["examples"] == pytest.approx(boot_assumed, rel=0.08)
    lines = plan_lines(parse_claims({"define": {"c": {
        "says": "x", "a": {"param": "fft"}, "b": {"param": "lora"}, "vary": ["lora_rank", "lr"],
        "metric": "accuracy", "kind": "greater"}}}, "t"),
        [RunConfig(**PARA, param=p, seed=s, **({"lr": 5e-4} if p == "lora" else {})).normalised()
         for s in range(3) for p in ("fft", "lora")], [n] * 6)
    mde, _ = assumed_mde(c, "accuracy", n, 3, ASSUME)
    assert any(f"1,000 dev examples × 3 seeds: {mde:.2f} points assumed" in line for line in lines)


# -- the report and the dry-run ---------------------------------------------------------------------------

def test_report_opens_with_the_claims_section(tmp_path):
    """The report's first section is Claims (Markdown, HTML, CSV and LaTeX): the paper's numbers, ours, the
    effect with its interval, the verdict in words and the detectable effect; one seed says "undecided at
    this size" (no p to adjust) with the examples-only detectable effect. Catches a section placed after the
    tables, a verdict from one seed, and a LaTeX file that is not written or not LaTeX."""
    st = Study(tmp_path, claims="paper")
    st.add(outputs(right_on(300)), **PARA, param="fft", seed=0)
    st.add(outputs(right_on(250)), **PARA, param="lora", lr=5e-4, seed=0)
    st.store.close()
    md = write_report(tmp_path).read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:2] == ["## Claims", "## Runs"]
    row = next(line for line in md.splitlines() if line.startswith("| 1 | FFT beats LoRA"))
    assert "FFT SFT 89.87 vs LoRA r=8 SFT 87.70 (Δ +2.17)" in row and "undecided at this size" in row
    test_row = next(line for line in md.splitlines() if line.startswith("| 1 | paraphrase: FFT vs LoRA r=8"))
    assert "75.00 (n=1)" in test_row and "62.50 (n=1)" in test_row and "+12.50 [" in test_row
    assert "(examples only)" in test_row and "n=1 seed: a verdict needs >= 3" in test_row
    out = tmp_path / "report"
    tex = (out / "table_claims.tex").read_text()
    assert "\\begin{tabular}" in tex and "undecided at this size" in tex
    # every symbol of the section is LaTeX (pdflatex takes no raw α or subscript digits)
    assert tex.isascii() and (out / "table_claims_tests.tex").read_text().isascii()
    with (out / "table_claims.csv").open() as fh:
        first = next(csv.DictReader(fh))
    assert first["Verdict"] == "undecided at this size (fewer than 3 paired seeds)" and first["p_Holm"] == "—"
    with (out / "table_claims_tests.csv").open() as fh:
        assert next(csv.DictReader(fh))["On its own"] == "no verdict (n=1 seed: a verdict needs >= 3)"
    assert "<h2>Claims</h2>" in (out / "report.html").read_text()
    # no spec, or a spec without claims: no section
    st2 = Study(tmp_path / "none")
    st2.add(outputs(right_on(300)), **PARA, param="fft", seed=0)
    st2.store.close()
    assert "## Claims" not in write_report(tmp_path / "none").read_text()


def test_dry_run_prints_assumed_detectable_effects(tmp_path, cache, capsys, monkeypatch):
    """`study run quick --dry-run` prints each claim's detectable effect from the design before anything
    is trained, marked assumed: 200 QQP dev pairs x 1 seed at discordance 0.2 is 2.80 * sqrt(0.2 / 200)
    = 8.86 points (hand-computed), 12 dev sonnets at chrF variance 3 is 1.40. Catches a dry-run without
    the claims, the full dev set where the spec caps it, and MDEs that say nothing of their assumption."""
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", "quick", "--dry-run", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "claims (paper): the smallest effect" in out and "assumed before any run" in out
    assert "paraphrase accuracy (%), 200 dev examples × 1 seed: 8.86 points assumed" in out
    assert "sonnet chrF, 12 dev examples × 1 seed: 1.40 chrF assumed" in out
    assert 2.8015852 * math.sqrt(0.2 / 200) * 100 == pytest.approx(8.86, abs=0.005)
    assert "4b sonnet-v3-pairs-do-not-help (no-greater-than, margin 0.5): no comparison in this study" in out
    assert N_BOOT >= 2000
