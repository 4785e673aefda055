"""The method comparison (a study over `--param` and `--objective`, e.g. the `methods` spec): a table in
the style of PEFT's `method_comparison` (quality, trainable parameters, time, memory, file size per
method) and the cost-vs-quality figure (dev metric against trainable parameters and against seconds
per epoch, one point per method, FFT as the reference line)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .figures import FONT, PANEL_H, PANEL_W, _COLORS, _legend_below
from .results import Condition, StudyResults, _mean, metric_columns, param_label, primary_metric, regime_label
from .table import Cell, Table

# what makes a study a method comparison: this many parameterizations, or two preference objectives
MIN_METHODS = 3


def _arm(cfg: dict) -> str:
    """The regime and preference objective a method is compared within (methods are compared only
    against the FFT run of the same arm)."""
    return regime_label(cfg)


def method_conditions(study: StudyResults, task: str) -> list[Condition]:
    """The task's headline conditions when they compare methods (≥ MIN_METHODS parameterizations or
    ≥ 2 preference stages of one regime); [] otherwise."""
    conds = study.main_conditions(task)
    params = {param_label(c.cfg) for c in conds}
    arms = defaultdict(set)
    for c in conds:
        if c.cfg.get("regime") != "sft":
            arms[(c.cfg.get("regime"), c.cfg.get("handoff_epoch"))].add(_arm(c.cfg))
    if len(params) >= MIN_METHODS or any(len(a) > 1 for a in arms.values()):
        return conds
    return []


def _fft_reference(conds: list[Condition]) -> dict[str, Condition]:
    """Per arm, the FFT condition (the first, in the report's order, when several)."""
    out: dict[str, Condition] = {}
    for c in conds:
        if c.cfg.get("param") == "fft":
            out.setdefault(_arm(c.cfg), c)
    return out


def table_methods(study: StudyResults) -> Table | None:
    rows: list[list[Cell]] = []
    untrained: list[list[Cell]] = []
    for task in study.tasks():
        conds = method_conditions(study, task)
        if not conds:
            continue
        key, label, scale = primary_metric(conds[0].cfg)
        second = _second_metric(conds[0].cfg, key)
        ref = _fft_reference(conds)
        init = next((c for c in conds if c.stat(f"init/{key}", scale) is not None), None)
        if init is not None:  # the baseline to beat (the same for every run of a backbone and dev set)
            untrained.append([task, "untrained (epoch 0)", str(init.cfg.get("model")), init.stat(f"init/{key}", scale),
                              init.stat(f"init/{second[0]}", second[1]) if second else None, "", "", None, None, None, ""])
        for c in sorted(conds, key=lambda c: (_arm(c.cfg), -(_mean(c, key, scale) or -math.inf))):
            s0 = c.runs[0]["summary"]
            tp, tot = s0.get("trainable_params"), s0.get("total_params")
            params = "—" if tp is None else f"{tp:,}" + (f" ({100 * tp / tot:.3g}%)" if tot else "")
            r = ref.get(_arm(c.cfg))
            m, fm = _mean(c, key, scale), (_mean(r, key, scale) if r is not None else None)
            delta = "" if m is None or fm is None or r is c else f"{m - fm:+.2f}"
            rows.append([task, _arm(c.cfg), param_label(c.cfg), c.stat(key, scale),
                         c.stat(*second) if second else None, delta, params,
                         c.stat("wall_clock_per_epoch_s", 1, 1), c.stat("peak_memory_mb", 1, 0),
                         c.stat("adapter_mb", 1, 2), ", ".join(f"{x:g}" for x in _rates(c))])
    if not rows:
        return None
    return Table("table_methods", "Method comparison (PEFT method_comparison style)",
                 ["Task", "Regime / objective", "Method", "Final dev metric", "Second metric", "Δ vs FFT (same regime)",
                  "Trainable params (% of total)", "Wall-clock / epoch (s)", "Peak memory (MB)",
                  "Trained weights on disk (MB)", "Learning rate(s)"], untrained + rows,
                 ["Final dev metric: the task's primary metric, accuracy (%) for classification, chrF for generation; "
                  "second metric: macro-F1 (%) for classification (a constant answer scores the majority share in "
                  "accuracy but at most 50 here), chrF of the continuation for sonnets. Rows sorted best first "
                  "within each regime; the untrained model first. Δ vs FFT: difference of seed means against the "
                  "FFT run of the same regime and objective (a point estimate: see the claims and key comparisons "
                  "for intervals). Learning rates: SFT lr, then the preference stage's."],
                 best=("Final dev metric", "Second metric"), reference_rows=len(untrained)
                 ).drop_empty("Second metric", "Trained weights on disk (MB)", "Δ vs FFT (same regime)")


def _second_metric(cfg: dict, primary: str) -> tuple[str, float] | None:
    """(summary key, scale) of the task's second dev metric (macro-F1, chrF of the continuation)."""
    rest = [(k, s) for k, _, s in metric_columns(cfg) if k != primary]
    return rest[0] if rest else None


def _rates(c: Condition) -> list[float]:
    cfg = c.cfg
    out = [] if cfg.get("regime") == "dpo" else [cfg.get("lr")]
    if cfg.get("regime") != "sft":
        out.append(cfg.get("dpo_lr"))
    return [float(x) for x in out if x is not None]


def figure_methods(study: StudyResults, task: str) -> Figure | None:
    """Two panels: the final primary dev metric against trainable parameters (log scale) and against
    wall-clock seconds per epoch; a point per method and regime (bars: ±1 std over seeds), FFT of each
    regime as a dashed line in the regime's colour, the untrained model as a grey dotted one. Regimes
    (and objectives) with one method only, e.g. an objective run on FFT alone, are left to the table."""
    conds = [c for c in method_conditions(study, task)
             if _mean(c, "trainable_params", 1.0) is not None and _mean(c, "wall_clock_per_epoch_s", 1.0) is not None]
    key, label, scale = primary_metric(conds[0].cfg) if conds else ("", "", 1.0)
    conds = [c for c in conds if _mean(c, key, scale) is not None]
    per_arm = Counter(_arm(c.cfg) for c in conds)
    conds = [c for c in conds if per_arm[_arm(c.cfg)] > 1]  # arms that compare methods (a lone objective: the table)
    if len(conds) < 2:
        return None
    arms = list(dict.fromkeys(_arm(c.cfg) for c in sorted(conds, key=lambda c: str(c.cfg.get("regime")))))
    colors = {a: _COLORS[i % len(_COLORS)] for i, a in enumerate(arms)}
    markers = "osD^vP*X"
    ref = _fft_reference(conds)
    # the pretrained model's level: FFT runs' epoch 0 (a virtual-token method's untrained model is another one)
    base = [c for c in conds if c.cfg.get("param") == "fft"] or conds
    init = [float(v) * scale for c in base for r in c.runs if (v := (r["summary"] or {}).get(f"init/{key}")) is not None]
    with matplotlib.rc_context(FONT):
        fig = Figure(figsize=(PANEL_W * 2, PANEL_H * 1.25 + 0.8), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (xkey, xlabel, log) in zip(axes, [("trainable_params", "trainable parameters", True),
                                                  ("wall_clock_per_epoch_s", "wall-clock per epoch (s)", False)]):
            for a in arms:
                if a in ref:
                    ax.axhline(_mean(ref[a], key, scale), color=colors[a], linestyle="--", linewidth=0.9)
            if init:
                ax.axhline(float(np.mean(init)), color="0.55", linestyle=":", linewidth=0.9)
            for c in conds:
                a = _arm(c.cfg)
                ys = [v for v in c.values(key, scale) if v is not None]
                xs = [v for v in c.values(xkey) if v is not None]
                x, y = float(np.mean(xs)), float(np.mean(ys))
                err = float(np.std(ys, ddof=1)) if len(ys) > 1 else None
                ax.errorbar([x], [y], yerr=None if err is None else [[err], [err]], color=colors[a],
                            marker=markers[arms.index(a) % len(markers)], markersize=4, linewidth=0.8, capsize=2)
                ax.annotate(param_label(c.cfg).split(" [")[0], (x, y), textcoords="offset points", xytext=(3, 2),
                            fontsize=5.5, color=colors[a])
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(label)
        handles = [Line2D([], [], color=colors[a], marker=markers[i % len(markers)], linestyle="none")
                   for i, a in enumerate(arms)]
        names = list(arms)
        if ref:
            handles.append(Line2D([], [], color="0.2", linestyle="--", linewidth=0.9))
            names.append("FFT of the regime")
        if init:
            handles.append(Line2D([], [], color="0.55", linestyle=":", linewidth=0.9))
            names.append("untrained (epoch 0)")
        n = sorted({len(c.runs) for c in conds})
        fig.suptitle(f"{task}: final {label} against cost, one point per method "
                     f"(n={'/'.join(map(str, n))} seed{'s' if n != [1] else ''})")
        _legend_below(fig, handles, names, max_cols=3)
        return fig
