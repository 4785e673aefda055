"""The report's figures: dev metric vs epoch per regime (hand-off), FFT vs LoRA at matched depth."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's global state
from matplotlib.figure import Figure

from .results import SHOWN, Condition, StudyResults, _settings, _sort_key, param_label, regime_label
from .tables import BASE_MATCH

# -- figures -----------------------------------------------------------------------------------

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
_REGIME_COLORS = {"sft": "#1f77b4", "dpo": "#d62728", "sft-dpo": "#2ca02c"}


def _new_figure(n_panels: int):
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _plot_condition(study: StudyResults, ax, cond: Condition, key: str, scale: float, label: str, **style) -> None:
    curves = [study.curve(r, key, scale) for r in cond.runs]
    epochs = sorted({e for c in curves for e in c})
    if not epochs:
        return
    means = [float(np.mean([c[e] for c in curves if e in c])) for e in epochs]
    stds = [float(np.std([c[e] for c in curves if e in c], ddof=1)) if sum(e in c for c in curves) > 1 else 0.0
            for e in epochs]
    (line,) = ax.plot(epochs, means, marker="o", markersize=3, label=f"{label} (n={len(cond.runs)})", **style)
    if len(cond.runs) > 1:
        ax.fill_between(epochs, np.subtract(means, stds), np.add(means, stds), color=line.get_color(), alpha=0.15,
                        linewidth=0)


def _label_axes(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch (across the whole run)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.xaxis.get_major_locator().set_params(integer=True)


def figure_handoff(study: StudyResults, task: str, path: Path) -> bool:
    conds = study.main_conditions(task)
    key, ylabel, scale = study.primary(task)
    panels: dict[tuple, list[Condition]] = defaultdict(list)
    for c in conds:
        panels[(c.cfg.get("model"), c.cfg.get("param") != "fft", c.cfg.get("lora_rank") if c.cfg.get("param") == "lora" else 0)].append(c)
    panels = {k: v for k, v in panels.items() if any(study.curve(r, key, scale) for c in v for r in c.runs)}
    if not panels:
        return False
    fig, axes = _new_figure(len(panels))
    for ax, (pk, pconds) in zip(axes, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        sett = _settings(pconds, SHOWN)
        for i, c in enumerate(pconds):
            color = _REGIME_COLORS.get(c.cfg.get("regime")) if len(pconds) <= 3 else _COLORS[i % len(_COLORS)]
            label = regime_label(c.cfg) + (f" [{sett[id(c)]}]" if sett[id(c)] else "")
            _plot_condition(study, ax, c, key, scale, label, color=color)
            if c.cfg.get("regime") == "sft-dpo" and c.cfg.get("handoff_epoch"):
                ax.axvline(c.cfg["handoff_epoch"], color=color, linestyle=":", linewidth=1.2)
        staged = any(c.cfg.get("regime") == "sft-dpo" for c in pconds)
        _label_axes(ax, f"{task}: {pk[0]}, {param_label(pconds[0].cfg)}" + (" (dotted: SFT→DPO hand-off)" if staged else ""),
                    ylabel)
    fig.suptitle(f"{task}: dev metric vs epoch by regime (mean ± std over seeds)", fontsize=11)
    fig.savefig(path, dpi=120)
    return True


def figure_fft_vs_lora(study: StudyResults, task: str, path: Path) -> bool:
    conds = study.main_conditions(task)
    key, ylabel, scale = study.primary(task)
    groups: dict[str, list[Condition]] = defaultdict(list)
    for c in conds:
        match = {k: c.cfg.get(k) for k in BASE_MATCH + ("regime", "handoff_epoch")}
        if c.cfg.get("regime") != "sft":
            match.update(pairs=c.cfg.get("pairs"), beta=c.cfg.get("beta"))
        groups[json.dumps(match, sort_keys=True, default=str)].append(c)
    panels = [g for g in groups.values()
              if {c.cfg.get("param") for c in g} == {"fft", "lora"}
              and any(study.curve(r, key, scale) for c in g for r in c.runs)]
    if not panels:
        return False
    fig, axes = _new_figure(len(panels))
    for ax, g in zip(axes, panels):
        g = sorted(g, key=lambda c: _sort_key(c.cfg))
        sett = _settings(g, SHOWN)
        lora_i = 0
        for c in g:
            label = param_label(c.cfg) + (f" [{sett[id(c)]}]" if sett[id(c)] else "")
            if c.cfg.get("param") == "fft":
                _plot_condition(study, ax, c, key, scale, label, color="black", linestyle="-", linewidth=2)
            else:
                _plot_condition(study, ax, c, key, scale, label, color=_COLORS[lora_i % len(_COLORS)], linestyle="--")
                lora_i += 1
        c0 = g[0].cfg
        _label_axes(ax, f"{c0.get('model')}: {regime_label(c0)}, {c0.get('epochs')} epochs", ylabel)
    fig.suptitle(f"{task}: FFT (solid) vs LoRA (dashed) at matched depth", fontsize=11)
    fig.savefig(path, dpi=120)
    return True


