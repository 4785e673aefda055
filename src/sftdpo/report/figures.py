"""The report's figures: dev metrics vs epoch per regime (hand-off), and FFT vs LoRA at matched depth.

Made to be read at a paper's column width: 3.3 x 2.3 inch panels, 8-point type, one legend below the
panels, a shared y axis per metric (row), the untrained model's level as a grey reference line, a
marker at each staged run's hand-off. Seeds: one seed is a line; two seeds are their own thin lines
around the mean (an interval from two values would only be their range); from three seeds the mean
with its 95% Student-t band. Each figure is written as PNG (for the Markdown/HTML report), PDF and
SVG (vector, for a paper)."""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's global state
from matplotlib.figure import Figure

from ..stats import t_interval
from .results import (SHOWN, Condition, StudyResults, _settings, _sort_key, best_of, metric_columns, param_label,
                      primary_metric, regime_label)
from .table import MIN_SEEDS_FOR_INTERVAL
from .tables import BASE_MATCH

PANEL_W, PANEL_H = 3.3, 2.3
# TrueType fonts in the PDF (venues reject Type 3) and text kept as text in the SVG (editable)
FONT = {"pdf.fonttype": 42, "svg.fonttype": "none", "font.size": 8, "figure.titlesize": 9, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
        "ytick.labelsize": 7}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
_REGIME_COLORS = {"sft": "#1f77b4", "dpo": "#d62728", "sft-dpo": "#2ca02c"}
FORMATS = ("png", "pdf", "svg")


def labels(conds: list[Condition], base) -> dict[int, str]:
    """Each condition's legend label: `base(cfg)` (e.g. "SFT@1→DPO", "LoRA r=8"), plus the settings
    that tell apart conditions sharing that base label (results._settings), and only those."""
    out = {}
    groups: dict[str, list[Condition]] = defaultdict(list)
    for c in conds:
        groups[base(c.cfg)].append(c)
    for name, group in groups.items():
        extra = _settings(group, SHOWN)
        for c in group:
            out[id(c)] = name + (f" ({extra[id(c)]})" if extra[id(c)] else "")
    return out


def _seeds_in_title(conds: list[Condition]) -> str:
    """Seed counts go in the title when every plotted condition has the same number ("" otherwise)."""
    ns = {len(c.runs) for c in conds}
    if len(ns) != 1:
        return ""
    n = ns.pop()
    return f" (n={n} seed{'s' if n > 1 else ''} each)"


def _with_seeds(names: dict[int, str], conds: list[Condition], in_title: str) -> dict[int, str]:
    """...else each legend label carries its condition's seed count."""
    return names if in_title else {id(c): f"{names[id(c)]} (n={len(c.runs)})" for c in conds}


def _plotted_metrics(study: StudyResults, conds: list[Condition]) -> list[tuple[str, str, float]]:
    """The task's dev metrics that have a curve in at least one run: a row per metric, none left empty
    (a study whose runs logged only accuracy per epoch gets no macro-F1 row)."""
    return [m for m in metric_columns(conds[0].cfg)
            if any(study.curve(r, m[0], 1.0) for c in conds for r in c.runs)]


def _figure(nrows: int, ncols: int):
    fig = Figure(figsize=(PANEL_W * ncols, PANEL_H * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey="row", sharex=True)
    return fig, axes


def _plot(study: StudyResults, ax, cond: Condition, key: str, scale: float, label: str, **style) -> None:
    curves = [study.curve(r, key, scale) for r in cond.runs]
    epochs = sorted({e for c in curves for e in c})
    if not epochs:
        return
    at = {e: [c[e] for c in curves if e in c] for e in epochs}
    means = [float(np.mean(at[e])) for e in epochs]
    n = len(cond.runs)
    style = {"linewidth": 1.4, **style}
    (line,) = ax.plot(epochs, means, marker="o", markersize=2.5, label=label, **style)
    if n >= MIN_SEEDS_FOR_INTERVAL:
        band = [t_interval(at[e])[2:] if len(at[e]) > 1 else (at[e][0], at[e][0]) for e in epochs]
        ax.fill_between(epochs, [b[0] for b in band], [b[1] for b in band], color=line.get_color(), alpha=0.15, linewidth=0)
    elif n == 2:
        for c in curves:
            es = sorted(c)
            ax.plot(es, [c[e] for e in es], color=line.get_color(), linewidth=0.6, alpha=0.5)
    handoff = cond.cfg.get("handoff_epoch")
    if cond.cfg.get("regime") == "sft-dpo" and handoff in epochs:
        ax.axvline(handoff, color=line.get_color(), linestyle=":", linewidth=1.0)
        ax.plot([handoff], [means[epochs.index(handoff)]], marker="D", markersize=4, color=line.get_color())


def _untrained(study: StudyResults, ax, conds: list[Condition], key: str, scale: float) -> None:
    vals = [v for c in conds for r in c.runs if (v := study.curve(r, key, scale).get(0)) is not None]
    if vals:
        ax.axhline(float(np.mean(vals)), color="0.55", linestyle="--", linewidth=0.9, label="untrained (epoch 0)")


def _finish(fig, axes, titles: list[str], metrics: list[tuple[str, str, float]], suptitle: str) -> Figure:
    for j, title in enumerate(titles):
        axes[0][j].set_title(title)
    for i, (_, label, _) in enumerate(metrics):
        axes[i][0].set_ylabel(label)
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[-1]:
        ax.set_xlabel("epoch (whole run)")
    handles: dict[str, object] = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
    ncols = len(titles)
    fig.suptitle(textwrap.fill(suptitle, 48 * ncols))
    _legend_below(fig, list(handles.values()), list(handles), max_cols=min(4, 2 * ncols))
    return fig


def _legend_below(fig: Figure, handles: list, names: list[str], max_cols: int) -> None:
    """A legend below the panels in as many columns as fit the figure's width (long labels wrapped
    when even one column does not fit): nothing spills past the figure's edge."""
    for wrap in (None, 36):
        texts = names if wrap is None else [textwrap.fill(n, wrap) for n in names]
        for ncol in range(max(1, min(len(names), max_cols)), 0, -1):
            leg = fig.legend(handles, texts, loc="outside lower center", frameon=False, ncol=ncol)
            fig.canvas.draw()
            box = leg.get_window_extent()
            if box.x0 >= 0 and box.x1 <= fig.bbox.x1:
                return
            leg.remove()
    fig.legend(handles, texts, loc="outside lower center", frameon=False, ncol=1)


def save(fig: Figure | None, path: Path) -> list[Path]:
    """The figure as PNG, PDF and SVG beside each other (nothing when there is no figure)."""
    if fig is None:
        return []
    paths = []
    with matplotlib.rc_context(FONT):
        for fmt in FORMATS:
            out = path.with_suffix(f".{fmt}")
            fig.savefig(out, dpi=200)
            paths.append(out)
    return paths


MAX_CURVES = 6


def _best_per_regime(conds: list[Condition]) -> tuple[list[Condition], dict[int, str]]:
    """A panel of a DPO sweep would carry a curve per setting: above MAX_CURVES conditions, each regime
    (hand-off) keeps its best condition on the final primary dev metric, labelled with what it was chosen from."""
    if len(conds) <= MAX_CURVES:
        return conds, {}
    by_regime: dict[str, list[Condition]] = defaultdict(list)
    for c in conds:
        by_regime[regime_label(c.cfg)].append(c)
    key, _, scale = primary_metric(conds[0].cfg)
    kept, names = [], {}
    for regime, group in by_regime.items():
        best = best_of(group, key, scale) or group[0]
        kept.append(best)
        if len(group) > 1:
            setting = _settings(group, SHOWN)[id(best)]
            names[id(best)] = f"{regime} (best of {len(group)}{': ' + setting if setting else ''})"
    return kept, names


def figure_handoff(study: StudyResults, task: str) -> Figure | None:
    """One column per backbone x parameterization, one row per dev metric: each regime's curve (in a
    DPO sweep, each regime's best setting)."""
    conds = study.main_conditions(task)
    if not conds:
        return None
    metrics = _plotted_metrics(study, conds)
    panels: dict[tuple, list[Condition]] = defaultdict(list)
    for c in conds:
        panels[(c.cfg.get("model"), c.cfg.get("param") != "fft", param_label(c.cfg))].append(c)
    panels = {k: v for k, v in sorted(panels.items(), key=lambda kv: str(kv[0])) if _plotted_metrics(study, v)}
    if not panels or not metrics:
        return None
    seeds = _seeds_in_title([c for p in panels.values() for c in p])
    with matplotlib.rc_context(FONT):
        fig, axes = _figure(len(metrics), len(panels))
        for j, pconds in enumerate(panels.values()):
            pconds, best_names = _best_per_regime(pconds)
            names = _with_seeds({**labels(pconds, regime_label), **best_names}, pconds, seeds)
            for i, (key, _, scale) in enumerate(metrics):
                _untrained(study, axes[i][j], pconds, key, scale)
                for k, c in enumerate(sorted(pconds, key=lambda c: _sort_key(c.cfg))):
                    color = _REGIME_COLORS.get(c.cfg.get("regime")) if len(pconds) <= 3 else _COLORS[k % len(_COLORS)]
                    _plot(study, axes[i][j], c, key, scale, names[id(c)], color=color)
        titles = [f"{p[0].cfg.get('model')}, {param_label(p[0].cfg)}" for p in panels.values()]
        return _finish(fig, axes, titles, metrics, f"{task}: dev metrics by epoch and regime (◆ hand-off){seeds}")


def figure_fft_vs_lora(study: StudyResults, task: str) -> Figure | None:
    """One column per regime (same data, decoding and DPO settings), FFT against each LoRA rank."""
    conds = study.main_conditions(task)
    if not conds:
        return None
    metrics = _plotted_metrics(study, conds)
    groups: dict[str, list[Condition]] = defaultdict(list)
    for c in conds:
        match = {k: c.cfg.get(k) for k in BASE_MATCH + ("regime", "handoff_epoch")}
        if c.cfg.get("regime") != "sft":
            match.update(pairs=c.cfg.get("pairs"), beta=c.cfg.get("beta"))
        groups[json.dumps(match, sort_keys=True, default=str)].append(c)
    panels = [sorted(g, key=lambda c: _sort_key(c.cfg)) for g in groups.values()
              if {c.cfg.get("param") for c in g} == {"fft", "lora"}
              and _plotted_metrics(study, g)]
    if not panels or not metrics:
        return None
    seeds = _seeds_in_title([c for g in panels for c in g])
    with matplotlib.rc_context(FONT):
        fig, axes = _figure(len(metrics), len(panels))
        for j, g in enumerate(panels):
            names = _with_seeds(labels(g, param_label), g, seeds)
            for i, (key, _, scale) in enumerate(metrics):
                _untrained(study, axes[i][j], g, key, scale)
                lora_i = 0
                for c in g:
                    if c.cfg.get("param") == "fft":
                        _plot(study, axes[i][j], c, key, scale, names[id(c)], color="black", linewidth=1.8)
                    else:
                        _plot(study, axes[i][j], c, key, scale, names[id(c)], color=_COLORS[lora_i % len(_COLORS)],
                              linestyle="--")
                        lora_i += 1
        titles = [f"{g[0].cfg.get('model')}: {regime_label(g[0].cfg)}" for g in panels]
        return _finish(fig, axes, titles, metrics, f"{task}: FFT (solid) vs LoRA (dashed) at matched depth{seeds}")
