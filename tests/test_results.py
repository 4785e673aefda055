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
