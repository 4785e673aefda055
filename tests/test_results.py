"""report/results.py, in-process: which condition is "best", the order conditions are listed in, which
metrics a task is tested on, the wall clock a cost curve adds up, the reference decoding temperature.
Every report table and figure that names a best setting, lists conditions or draws a cost axis reads these."""

import random

import pytest

from sftdpo.report import results as res  # not its test_metrics by name: pytest would collect it
from sftdpo.report.results import Condition, StudyResults, _mean, best_of
from test_report import Builder


def cond(*accuracies: float | None) -> Condition:
    """A condition whose seeds' runs have these dev accuracies (None: a run without the metric)."""
    runs = [{"summary": {} if a is None else {"dev/accuracy": a}} for a in accuracies]
    return Condition({"task": "paraphrase"}, runs)


def test_best_of_is_the_highest_mean_and_the_first_of_equal_ones():
    """Catches a best_of that breaks a tie towards the later condition (max over (mean, index), or
    over (mean, +index)), one that takes a condition without the metric, and one that ranks by a
    single seed instead of the mean."""
    low, first, second, missing = cond(0.80, 0.82), cond(0.90, 0.92), cond(0.92, 0.90), cond(None)
    one_lucky_seed = cond(0.99, 0.70)  # mean 0.845: below the two tied at 0.91
    assert best_of([low, first, one_lucky_seed, second, missing], "dev/accuracy") is first
    assert best_of([missing, second, first], "dev/accuracy", 100.0) is second
    assert best_of([missing], "dev/accuracy") is None
    assert best_of([], "dev/accuracy") is None


def test_mean_of_no_condition_is_none():
    """sweep.py asks for the SFT reference's mean where a group has none: catches a _mean that
    calls .stat on None."""
    assert _mean(None, "dev/accuracy", 1.0) is None
    assert _mean(cond(0.5, 0.7), "dev/accuracy", 100.0) == pytest.approx(60.0)


@pytest.mark.parametrize("cfg,metrics", [
    ({"task": "paraphrase"}, ["accuracy", "macro_f1"]),
    ({"task": "classify", "task_name": "nli"}, ["accuracy", "macro_f1"]),
    ({"task": "sonnet"}, ["chrf"]),
    ({"task": "generate", "metric": "bleu"}, ["chrf"]),  # BLEU has no per-example statistics: chrF is tested
])
def test_each_task_is_tested_on_its_own_metrics(cfg, metrics):
    """Catches a test_metrics that loses the task (paraphrase tested on chrF) or reads another key."""
    assert [m for m, _, _ in res.test_metrics(cfg)] == metrics


def test_cumulative_wall_adds_each_epochs_seconds_from_zero(tmp_path):
    """The cost curves' x axis: catches a sum that starts at 1 s, counts the untimed epoch 0 as 1 s,
    keeps only the last epoch's seconds, subtracts them, or reads another run's epochs."""
    b = Builder(tmp_path)
    b.add(task="paraphrase", model="gpt2", regime="sft", param="fft", epochs=3, seed=0, final=0.9, wall=10.0)
    b.add(task="paraphrase", model="gpt2", regime="sft", param="fft", epochs=2, seed=1, final=0.9, wall=4.0)
    results = StudyResults(b.store)
    by_seed = {r["config"]["seed"]: r for r in results.done}
    assert results.cumulative_wall(by_seed[0]) == [(0, 0.0), (1, 10.0), (2, 20.0), (3, 30.0)]
    assert results.cumulative_wall(by_seed[1]) == [(0, 0.0), (1, 4.0), (2, 8.0)]


def test_reference_temperature_is_the_most_used_and_none_without_sonnets(tmp_path):
    """Catches a reference temperature taken from an empty count (a study without sonnet runs) and one
    that is not the most used (ties: the lowest)."""
    b = Builder(tmp_path)
    b.add(task="paraphrase", model="gpt2", regime="sft", param="fft", epochs=1, seed=0, final=0.9)
    assert StudyResults(b.store).reference_temperature() is None
    for seed, temp in ((0, 0.7), (1, 0.7), (0, 1.0)):
        b.add(task="sonnet", model="smollm2-135m", regime="sft", param="fft", epochs=1, seed=seed, final=0.4,
              temperature=temp)
    assert StudyResults(b.store).reference_temperature() == 0.7
    b.add(task="sonnet", model="smollm2-135m", regime="sft", param="fft", epochs=1, seed=1, final=0.4, temperature=1.0)
    assert StudyResults(b.store).reference_temperature() == 0.7  # two each: the lower one


# how the report lists conditions (tables, figures): task, model, regime, hand-off, FFT first, LoRA rank, pairs
REPORT_ORDER = [
    {"task": "classify", "task_name": "nli", "model": "gpt2", "regime": "sft", "param": "fft"},
    # SFT ignores pairs: the JSON decides between these three (beta first)
    {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "fft", "beta": 0.1, "pairs": "v3"},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "fft", "beta": 0.5, "pairs": "v1"},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "fft"},
    # after FFT, though its JSON ("pairs" < "param") sorts first
    {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "dora", "pairs": "v3"},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "lora", "lora_rank": 1},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "lora", "lora_rank": 4},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "lora", "lora_rank": 16},
    # a DPO stage goes by its pairs, against the JSON (beta 0.1 < 0.5)
    {"task": "paraphrase", "model": "gpt2", "regime": "dpo", "param": "fft", "beta": 0.5, "pairs": "v1"},
    {"task": "paraphrase", "model": "gpt2", "regime": "dpo", "param": "fft", "beta": 0.1, "pairs": "v3"},
    {"task": "paraphrase", "model": "gpt2", "regime": "dpo", "param": "lora", "lora_rank": 8, "pairs": "v1"},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft-dpo", "handoff_epoch": 1, "param": "fft"},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft-dpo", "handoff_epoch": 2, "param": "fft"},
    {"task": "paraphrase", "model": "gpt2", "regime": "sft-dpo", "handoff_epoch": 10, "param": "fft"},
    {"task": "paraphrase", "model": "smollm2-135m", "regime": "sft", "param": "fft"},
    {"task": "paraphrase", "model": "smollm2-135m", "regime": "sft-dpo", "handoff_epoch": 1, "param": "fft"},
    {"task": "sonnet", "model": "gpt2", "regime": "sft", "param": "fft"},
]


def test_conditions_are_listed_in_report_order():
    """Catches a sort key that drops or reorders a component (the model, the regime's order SFT, DPO,
    SFT@k→DPO, the hand-off epoch, FFT before PEFT, the LoRA rank as a number, the pairs of DPO stages
    only), which would interleave one model's or regime's rows with another's in every table. Rows are
    chosen so that the last tie-break, the config's JSON, would order them otherwise."""
    shuffled = REPORT_ORDER[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert sorted(shuffled, key=res._sort_key) == REPORT_ORDER
    # the order of a stored config's fields (another version's index) does not move a row
    reordered = [dict(reversed(list(c.items()))) for c in shuffled]
    assert sorted(reordered, key=res._sort_key) == REPORT_ORDER


@pytest.mark.parametrize("cfg,label", [
    ({"regime": "sft", "objective": "kto", "loss_type": "ipo"}, "SFT"),  # no preference stage, whatever it says
    ({"regime": "dpo"}, "DPO-only"),  # TRL's defaults: the DPO objective, the sigmoid loss
    ({"regime": "dpo", "objective": None, "loss_type": None}, "DPO-only"),
    ({"regime": "dpo", "loss_type": "ipo"}, "DPO (ipo)-only"),
    ({"regime": "sft-dpo", "handoff_epoch": 4, "objective": "cpo", "loss_type": "hinge"}, "SFT@4→CPO (hinge)"),
    ({"regime": "dpo", "objective": "orpo", "loss_type": "ipo"}, "ORPO-only"),  # ORPO has one loss: no suffix
    ({"regime": "dpo", "objective": "simpo", "loss_type": "hinge"}, "SimPO-only"),
    ({"regime": "dpo", "objective": "newpo"}, "newpo-only"),  # an objective without a display name keeps its own
    ({"regime": "dpo", "loss_type": "sigmoid,sft", "loss_weights": [1.0, 0.25]}, "DPO (sigmoid,sft × 1/0.25)-only"),
    ({"regime": "dpo", "loss_type": "sigmoid,sft", "loss_weights": None}, "DPO (sigmoid,sft)-only"),
])
def test_regime_labels_name_stage_objective_loss_and_weights(cfg, label):
    """The row label of every table: catches a label that names a loss for objectives without one (ORPO,
    SimPO), drops the loss type or the weights, formats weights other than 1/0.25, forgets TRL's
    defaults (no objective = DPO, no loss type = sigmoid) or calls an SFT-only run by its unused objective."""
    assert res.regime_label(cfg) == label


@pytest.mark.parametrize("v,text", [(0.1, "0.1"), (1e-05, "1e-05"), (2.0, "2"), (3, "3"), ("v1", "v1"),
                                    ([0.5, 2, "x"], "0.5/2/x"), ((1.0, [0.25, 3e-06]), "1/0.25/3e-06"), (True, "True")])
def test_setting_values_are_printed_short(v, text):
    """Catches a formatter that prints floats with repr (0.1 as 0.1 but 2.0 as "2.0", 1e-05 as 0.00001),
    joins lists another way or does not recurse into nested ones."""
    assert res._fmt_value(v) == text


@pytest.mark.parametrize("cfg,columns,primary,name", [
    ({"task": "paraphrase"}, ["dev/accuracy", "dev/macro_f1"], ("dev/accuracy", "dev accuracy (%)", 100.0),
     "paraphrase"),
    ({"task": "sonnet"}, ["dev/chrf", "dev/chrf_continuation"], ("dev/chrf", "dev chrF", 1.0), "sonnet"),
    ({"task": "classify", "task_name": "nli"}, ["dev/accuracy", "dev/macro_f1"],
     ("dev/accuracy", "dev accuracy (%)", 100.0), "nli"),
    ({"task": "generate", "task_name": "poems"}, ["dev/chrf", "dev/bleu"], ("dev/chrf", "dev chrF", 1.0), "poems"),
    ({"task": "generate", "metric": "bleu"}, ["dev/chrf", "dev/bleu"], ("dev/bleu", "dev BLEU", 1.0), "generate"),
    ({"task": "generate", "task_name": None, "metric": "chrf"}, ["dev/chrf", "dev/bleu"], ("dev/chrf", "dev chrF", 1.0),
     "generate"),
    ({}, ["dev/chrf", "dev/bleu"], ("dev/chrf", "dev chrF", 1.0), ""),
])
def test_each_task_reports_its_metrics_in_its_units(cfg, columns, primary, name):
    """Which numbers a table shows and which one decides "best": catches a classify task reported in chrF, accuracy
    not scaled to percent, a column under another title, a generate task ranked by chrF when configured for
    BLEU (or labelled BLEU when ranked by chrF), and a custom task listed under its kind instead of its
    name."""
    cols = res.metric_columns(cfg)
    assert [k for k, _, _ in cols] == columns
    titles = {"dev/accuracy": "Accuracy (%)", "dev/macro_f1": "Macro-F1 (%)", "dev/chrf": "chrF",
              "dev/chrf_continuation": "chrF (continuation)", "dev/bleu": "BLEU"}
    if cfg.get("task") == "sonnet":
        titles["dev/chrf"] = "chrF (full)"
    assert [t for _, t, _ in cols] == [titles[k] for k in columns]  # the tables' column titles
    assert all(s == (100.0 if k in ("dev/accuracy", "dev/macro_f1") else 1.0) for k, _, s in cols)
    assert res.primary_metric(cfg) == primary
    assert res.task_name(cfg) == name


def test_condition_values_scale_each_seed_and_keep_missing_ones_apart():
    """Catches values that drop a seed without the metric (the mean of the others would pass for all
    seeds), scale it to 0, or scale the wrong way; and a stat over other values."""
    c = Condition({"task": "paraphrase"}, [{"summary": {"dev/accuracy": 0.5}}, {"summary": None},
                                           {"summary": {"dev/accuracy": 0.75, "dev/macro_f1": 0.1}}])
    assert c.values("dev/accuracy", 100.0) == [50.0, None, 75.0]
    assert c.values("dev/accuracy") == [0.5, None, 0.75]
    s = cond(0.5, 0.7).stat("dev/accuracy", 100.0)
    assert s.mean == pytest.approx(60.0) and s.n == 2
    assert str(s) == "50.00, 70.00 (n=2)"  # a table cell: two decimals unless asked
    assert str(cond(0.5, 0.7).stat("dev/accuracy", 100.0, decimals=1)) == "50.0, 70.0 (n=2)"
    assert cond(None, None).stat("dev/accuracy") is None


def test_runs_group_into_conditions_by_every_field_but_the_seed(tmp_path):
    """Catches grouping that keeps the seed in the key (three conditions of one run each), drops a field
    that does make a condition (the learning rate), takes unfinished or failed runs, keeps two runs of
    one seed (a re-added run counted twice; the first in study order wins), or leaves the seed in the
    condition's config."""
    b = Builder(tmp_path)
    base = dict(task="paraphrase", model="gpt2", regime="sft", param="fft", epochs=1)
    for seed, acc in ((2, 0.92), (0, 0.90), (1, 0.91)):
        b.add(**base, seed=seed, final=acc)
    b.add(**base, seed=3, status="failed", error="boom")
    b.add(**base, seed=4, status="pending")
    b.add(**base, lr=1e-3, seed=0, final=0.5)
    results = StudyResults(b.store)
    assert len(results.done) == 4
    assert sorted(len(c.runs) for c in results.conditions) == [1, 3]
    three = next(c for c in results.conditions if len(c.runs) == 3)
    assert sorted(three.values("dev/accuracy")) == pytest.approx([0.90, 0.91, 0.92])
    assert [r["config"]["seed"] for r in three.runs] == [0, 1, 2]
    assert "seed" not in three.cfg and three.cfg["model"] == "gpt2"
    one = next(c for c in results.conditions if len(c.runs) == 1)
    assert one.cfg["lr"] == 1e-3 and one.values("dev/accuracy") == [0.5]


class RunList:
    """A store holding just these runs (the index's rows: config, status, summary, order)."""

    def __init__(self, *runs: tuple):
        """runs: (config, dev accuracy or None for no summary, order[, status])."""
        self._runs = [{"run_hash": f"h{i}", "config": cfg, "status": rest[0] if rest else "done", "order": order,
                       "summary": None if acc is None else {"dev/accuracy": acc}}
                      for i, (cfg, acc, order, *rest) in enumerate(runs)]

    def runs(self) -> list[dict]:
        return self._runs


def test_a_seed_run_twice_counts_once_and_the_earlier_run_wins():
    """Two done runs of one seed in one condition (they differ only in bookkeeping, e.g. an index written
    by a version that hashed it): catches a condition that counts both (the seed weighs double in the
    mean), keeps the later one in study order, counts a done run without a summary or a run that is not
    done but kept the summary of an earlier attempt; and a grouping whose key depends on the order of the
    stored config's fields (an index written by another version)."""
    cfg = {"task": "paraphrase", "model": "gpt2", "regime": "sft", "param": "fft"}
    reordered = dict(reversed(list(cfg.items())))
    store = RunList((cfg | {"seed": 1, "log_every": 5}, 0.6, 3), (reordered | {"seed": 1}, 0.9, 1),
                    (cfg | {"seed": 0}, 0.8, 2), (cfg | {"seed": 2}, None, 0), (cfg | {"seed": 3}, 0.1, 4, "running"),
                    (cfg | {"seed": 4}, 0.1, 5, "failed"))
    (c,) = StudyResults(store).conditions
    assert c.values("dev/accuracy") == [0.8, 0.9]


def test_tasks_list_the_papers_first_then_custom_ones_by_name():
    """Catches a task list in study order, one that loses the paper's tasks' lead or sorts custom ones
    in reverse."""
    tasks = ({"task": "classify", "task_name": "zeta"}, {"task": "sonnet"}, {"task": "classify", "task_name": "alpha"},
             {"task": "paraphrase"}, {"task": "sonnet", "lr": 1.0})
    store = RunList(*((t | {"model": "gpt2", "regime": "sft", "param": "fft"}, 0.5, i) for i, t in enumerate(tasks)))
    assert StudyResults(store).tasks() == ["paraphrase", "sonnet", "alpha", "zeta"]


class Epochs(RunList):
    """RunList with per-epoch rows for the curves: {run_hash: [(epoch, metrics), ...]}."""

    def __init__(self, epochs: dict[str, list[tuple[int, dict]]], *runs):
        super().__init__(*runs)
        self._epochs = epochs
        self.reads = 0

    def epochs(self, run_hash: str) -> list[dict]:
        self.reads += 1
        return [{"epoch": e, "metrics": m, "wall_s": None} for e, m in self._epochs.get(run_hash, [])]


def test_best_reads_the_summary_else_the_curves_highest_earliest_epoch():
    """The "best epoch" columns and the hand-off figures: catches a best that ignores the summary's best
    (or reads only one of its two spellings), takes the curve's last or lowest point, breaks a tie towards
    the later epoch, forgets epoch 0 or the scale, and a curve that keeps epochs without the metric."""
    curve = [(0, {"dev/accuracy": 0.5}), (1, {"dev/accuracy": 0.8}), (2, {"dev/accuracy": None, "train/loss": 1.0}),
             (3, {"dev/accuracy": 0.8}), (4, {"dev/accuracy": 0.7})]
    store = Epochs({"h": curve, "init": [(0, {"dev/accuracy": 0.9}), (1, {"dev/accuracy": 0.6})]})
    results = StudyResults(store)
    run = {"run_hash": "h", "summary": None}
    assert results.curve(run, "dev/accuracy", 100.0) == {0: 50.0, 1: 80.0, 3: 80.0, 4: 70.0}
    assert results.best(run, "dev/accuracy", 100.0) == (80.0, 1)
    assert results.best({"run_hash": "init", "summary": {}}, "dev/accuracy", 1.0) == (0.9, 0)
    assert results.best({"run_hash": "none", "summary": None}, "dev/accuracy", 1.0) == (None, None)
    summary = {"best/dev/accuracy": 0.95, "best_epoch": 2, "best/accuracy": 0.1}
    assert results.best({"run_hash": "h", "summary": summary}, "dev/accuracy", 100.0) == (95.0, 2)
    older = {"best/accuracy": 0.25, "best_epoch": 3}  # the summary key without its "dev/"
    assert results.best({"run_hash": "h", "summary": older}, "dev/accuracy", 1.0) == (0.25, 3)
    assert store.reads == 3  # each run's epochs read once (h twice from the cache)


def test_headline_tables_keep_the_full_data_and_the_reference_temperature():
    """Catches main conditions that keep the smallest data fraction, mix fractions, treat a missing fraction as
    other than 1.0 or take 1.0 as the largest where no run has it, or mix sonnet temperatures (or filter
    paraphrase runs by temperature)."""
    base = {"model": "gpt2", "regime": "sft", "param": "fft"}
    store = RunList(
        (base | {"task": "paraphrase", "data_fraction": 0.1}, 0.7, 0),
        (base | {"task": "paraphrase"}, 0.9, 1),
        (base | {"task": "paraphrase", "data_fraction": 1.0, "lr": 1e-3, "temperature": 0.3}, 0.8, 2),
        (base | {"task": "sonnet", "temperature": 0.7}, 0.4, 3),
        (base | {"task": "sonnet", "temperature": 0.7, "lr": 1e-3}, 0.4, 4),
        (base | {"task": "sonnet", "temperature": 1.2}, 0.4, 5),
        (base | {"task": "sonnet", "temperature": 0.7, "data_fraction": 0.5}, 0.4, 6),
        (base | {"task": "classify", "task_name": "nli", "data_fraction": 0.1}, 0.6, 7),
        (base | {"task": "classify", "task_name": "nli", "data_fraction": 0.5}, 0.7, 8))
    results = StudyResults(store)
    para = results.main_conditions("paraphrase")
    assert sorted(c.values("dev/accuracy")[0] for c in para) == [0.8, 0.9]
    sonnet = results.main_conditions("sonnet")
    assert len(sonnet) == 2 and {c.cfg["temperature"] for c in sonnet} == {0.7}
    assert all(c.cfg.get("data_fraction", 1.0) == 1.0 for c in sonnet)
    (nli,) = results.main_conditions("nli")  # a study without full data: its largest fraction
    assert nli.cfg["data_fraction"] == 0.5
    assert results.main_conditions("topics") == []
    assert results.primary("sonnet") == ("dev/chrf", "dev chrF", 1.0)


def test_row_settings_name_only_the_fields_that_vary_where_they_matter():
    """What a table row adds to its label: catches settings that repeat a value every run shares, name a
    shown column again, count a field's value in runs that never read it (lora_alpha of an FFT run, beta
    of an SFT run) as variation, print it for those runs, or drop the seed/bookkeeping filter."""
    base = {"task": "paraphrase", "model": "gpt2", "epochs": 3}
    conds = [Condition(base | cfg, []) for cfg in (
        {"regime": "sft", "param": "fft", "beta": 0.5, "lora_alpha": 64, "log_every": 1},
        {"regime": "sft", "param": "lora", "lora_rank": 8, "lora_alpha": 16, "beta": 0.9, "log_every": 2},
        {"regime": "dpo", "param": "lora", "lora_rank": 8, "lora_alpha": 32, "beta": 0.1},
        {"regime": "dpo", "param": "fft", "beta": 0.5, "lora_alpha": 16})]
    settings = res._settings(conds, res.SHOWN)
    assert [settings[id(c)] for c in conds] == ["", "lora_alpha=16", "beta=0.1, lora_alpha=32", "beta=0.5"]
    assert res._settings(conds, res.SHOWN | {"beta", "lora_alpha"}) == {id(c): "" for c in conds}
