"""A study's results as the report sees them: conditions (runs that differ only in the seed), their
labels, and the fields that vary between them."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from ..config import NON_RESULT_FIELDS, TASK_KIND, RunConfig, irrelevant_fields
from ..config import param_label as config_param_label
from ..store import Store
from .table import Stat, _stat

_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}

# (summary key, column title, scale to display units)
TASK_METRICS = {
    "paraphrase": [("dev/accuracy", "Accuracy (%)", 100.0), ("dev/macro_f1", "Macro-F1 (%)", 100.0)],
    "sonnet": [("dev/chrf", "chrF (full)", 1.0), ("dev/chrf_continuation", "chrF (continuation)", 1.0)],
}
PRIMARY = {"paraphrase": ("dev/accuracy", "dev accuracy (%)", 100.0), "sonnet": ("dev/chrf", "dev chrF", 1.0)}
# stats.paired_bootstrap metric, summary key for the label, scale
TEST_METRICS = {"paraphrase": [("accuracy", "accuracy (%)", 100.0), ("macro_f1", "macro-F1 (%)", 100.0)],
                "sonnet": [("chrf", "chrF", 1.0)]}



def task_name(cfg: dict) -> str:
    """The task a run belongs to in the report: a custom task's name, else the task."""
    return cfg.get("task_name") or cfg.get("task", "")


def metric_columns(cfg: dict) -> list[tuple[str, str, float]]:
    """(summary key, column title, scale) of a task's dev metrics."""
    task = cfg.get("task", "")
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    if TASK_KIND.get(task) == "classify":
        return TASK_METRICS["paraphrase"]
    return [("dev/chrf", "chrF", 1.0), ("dev/bleu", "BLEU", 1.0)]


def primary_metric(cfg: dict) -> tuple[str, str, float]:
    """(summary key, axis label, scale) of a task's primary dev metric."""
    task = cfg.get("task", "")
    if task in PRIMARY:
        return PRIMARY[task]
    if TASK_KIND.get(task) == "classify":
        return PRIMARY["paraphrase"]
    metric = cfg.get("metric", "chrf")
    return f"dev/{metric}", f"dev {'chrF' if metric == 'chrf' else 'BLEU'}", 1.0


def test_metrics(cfg: dict) -> list[tuple[str, str, float]]:
    """stats.paired_bootstrap metrics of a task (BLEU has no per-example statistics here: chrF is tested)."""
    task = cfg.get("task", "")
    return TEST_METRICS.get(task) or TEST_METRICS["paraphrase" if TASK_KIND.get(task) == "classify" else "sonnet"]


# fields that do not make a condition: the seed (pooled) and bookkeeping
NON_CONDITION = ("seed", *NON_RESULT_FIELDS)
REGIME_ORDER = {"sft": 0, "dpo": 1, "sft-dpo": 2}


# -- labels ------------------------------------------------------------------------------------

OBJECTIVE_NAMES = {"dpo": "DPO", "simpo": "SimPO", "cpo": "CPO", "orpo": "ORPO", "kto": "KTO"}


def preference_label(cfg: dict) -> str:
    """The preference stage's objective: "DPO" (TRL's default sigmoid loss), "DPO (ipo)", "DPO
    (sigmoid,bco_pair,sft × 0.8,0.2,1)", "SimPO", "CPO (hinge)", "ORPO", "KTO"."""
    obj = cfg.get("objective") or "dpo"
    name = OBJECTIVE_NAMES.get(obj, obj)
    loss = cfg.get("loss_type") or "sigmoid"
    if obj in ("dpo", "cpo") and loss != "sigmoid":
        weights = cfg.get("loss_weights")
        name += f" ({loss}" + (f" × {_fmt_value(weights)}" if weights else "") + ")"
    return name


def regime_label(cfg: dict) -> str:
    r = cfg.get("regime")
    if r == "sft":
        return "SFT"
    pref = preference_label(cfg)
    return f"{pref}-only" if r == "dpo" else f"SFT@{cfg.get('handoff_epoch')}→{pref}"


def param_label(cfg: dict) -> str:
    return config_param_label(cfg)  # one definition, in config (model cards use it too)


def _relevant(cfg: dict, f: str) -> bool:
    """Whether a config field can matter for this run (config.irrelevant_fields: pairs for SFT or
    LoRA rank for FFT cannot)."""
    return f not in irrelevant_fields(RunConfig.from_dict({k: v for k, v in cfg.items() if k in _FIELDS}))


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sort_key(cfg: dict) -> tuple:
    return (task_name(cfg), str(cfg.get("model", "")), REGIME_ORDER.get(cfg.get("regime"), 9),
            cfg.get("handoff_epoch") or 0, cfg.get("param") != "fft",
            cfg.get("lora_rank") if cfg.get("param") == "lora" else 0,
            str(cfg.get("pairs")) if cfg.get("regime") != "sft" else "",
            json.dumps(cfg, sort_keys=True, default=str))


# -- study data --------------------------------------------------------------------------------

@dataclass
class Condition:
    """All done runs sharing every config field except the seed."""

    cfg: dict
    runs: list[dict]

    @property
    def task(self) -> str:
        return task_name(self.cfg)

    def values(self, key: str, scale: float = 1.0) -> list[float | None]:
        return [None if (r["summary"] or {}).get(key) is None else r["summary"][key] * scale for r in self.runs]

    def stat(self, key: str, scale: float = 1.0, decimals: int = 2) -> Stat | None:
        return _stat(self.values(key, scale), decimals)


def _mean(c: Condition | None, key: str, scale: float) -> float | None:
    s = c.stat(key, scale) if c is not None else None
    return None if s is None else s.mean


def best_of(conds: list[Condition], key: str, scale: float = 1.0) -> Condition | None:
    """The condition with the highest seed mean of `key` (ties: the first in report order)."""
    scored = [(m, i, c) for i, c in enumerate(conds) if (m := _mean(c, key, scale)) is not None]
    return max(scored, key=lambda t: (t[0], -t[1]))[2] if scored else None


def _cond_key(cfg: dict, drop: tuple[str, ...] = ()) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k not in NON_CONDITION + drop}, sort_keys=True, default=str)


class StudyResults:
    """The index's contents grouped for reporting; epochs and dev outputs are read lazily."""

    def __init__(self, store: Store):
        self.store = store
        self.all_runs = store.runs()
        self.done = [r for r in self.all_runs if r["status"] == "done" and r["summary"] is not None]
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in self.done:
            groups[_cond_key(r["config"])].append(r)
        self.conditions: list[Condition] = []
        for runs in groups.values():
            by_seed: dict[Any, dict] = {}
            for r in sorted(runs, key=lambda r: (str(r["config"].get("seed")), r["order"])):
                by_seed.setdefault(r["config"].get("seed"), r)
            cfg = {k: v for k, v in runs[0]["config"].items() if k not in NON_CONDITION}
            self.conditions.append(Condition(cfg, list(by_seed.values())))
        self.conditions.sort(key=lambda c: _sort_key(c.cfg))
        self._epochs: dict[str, list[dict]] = {}
        self._outputs: dict[str, list[tuple[str, str, str]]] = {}

    def epochs(self, run_hash: str) -> list[dict]:
        if run_hash not in self._epochs:
            self._epochs[run_hash] = self.store.epochs(run_hash)
        return self._epochs[run_hash]

    def outputs(self, run_hash: str) -> list[tuple[str, str, str]]:
        if run_hash not in self._outputs:
            self._outputs[run_hash] = self.store.dev_outputs(run_hash)
        return self._outputs[run_hash]

    def task_conditions(self, task: str) -> list[Condition]:
        return [c for c in self.conditions if c.task == task]

    def tasks(self) -> list[str]:
        """The tasks of the finished runs: the paper's first, then custom tasks by name."""
        names = list(dict.fromkeys(c.task for c in self.conditions))
        return [t for t in ("paraphrase", "sonnet") if t in names] + sorted(t for t in names if t not in ("paraphrase", "sonnet"))

    def reference_temperature(self) -> float | None:
        """The sonnet decoding temperature most runs used (ties: the lowest)."""
        temps = Counter(r["config"].get("temperature") for r in self.done if r["config"].get("task") == "sonnet")
        return min(temps, key=lambda t: (-temps[t], t)) if temps else None

    def main_conditions(self, task: str) -> list[Condition]:
        """Conditions of the headline tables: full data (largest fraction) and, for sonnets,
        the reference decoding temperature; other fractions/temperatures get their own tables."""
        conds = self.task_conditions(task)
        if not conds:
            return []
        top = max(c.cfg.get("data_fraction", 1.0) for c in conds)
        conds = [c for c in conds if c.cfg.get("data_fraction", 1.0) == top]
        if task == "sonnet":
            t = self.reference_temperature()
            conds = [c for c in conds if c.cfg.get("temperature") == t]
        return conds

    def primary(self, task: str) -> tuple[str, str, float]:
        return primary_metric(self.task_conditions(task)[0].cfg)

    def curve(self, run: dict, key: str, scale: float) -> dict[int, float]:
        """epoch -> dev metric (display units), including epoch 0 when evaluated before training."""
        out: dict[int, float] = {}
        for e in self.epochs(run["run_hash"]):
            v = e["metrics"].get(key)
            if v is not None:
                out[int(e["epoch"])] = float(v) * scale
        return out

    def best(self, run: dict, key: str, scale: float) -> tuple[float | None, float | None]:
        """(best dev metric, its epoch): from the summary, else from the epoch curve."""
        s = run["summary"] or {}
        for k in (f"best/{key}", f"best/{key.split('/', 1)[-1]}"):
            if s.get(k) is not None:
                return float(s[k]) * scale, s.get("best_epoch")
        curve = self.curve(run, key, scale)
        if not curve:
            return None, None
        ep = max(curve, key=lambda e: (curve[e], -e))
        return curve[ep], ep

    def cumulative_wall(self, run: dict) -> list[tuple[int, float]]:
        """(epoch, cumulative training wall-clock) in epoch order; untimed rows (epoch 0) add 0."""
        total, out = 0.0, []
        for e in self.epochs(run["run_hash"]):
            total += float(e["wall_s"] or 0.0)
            out.append((int(e["epoch"]), total))
        return out


def _settings(conds: list[Condition], shown: set[str]) -> dict[int, str]:
    """Per condition, the config fields (not already columns) that tell it apart: those with more than
    one value among the conditions that read them (lora_alpha only among LoRA runs, dpo_lr only among
    runs with a DPO stage), so a setting every run shares is never repeated in each row."""
    fields = sorted({k for c in conds for k in c.cfg} - shown - set(NON_CONDITION))
    relevant = {(id(c), f): _relevant(c.cfg, f) for c in conds for f in fields}
    varying = [f for f in fields
               if len({json.dumps(c.cfg.get(f), default=str) for c in conds if relevant[(id(c), f)]}) > 1]
    return {id(c): ", ".join(f"{f}={_fmt_value(c.cfg.get(f))}" for f in varying if relevant[(id(c), f)])
            for c in conds}


SHOWN = {"task", "model", "regime", "handoff_epoch", "param", "lora_rank"}


