"""DPO hyper-parameter selection and hand-off timing: heat maps of a dev metric over (β, DPO learning
rate) per hand-off epoch k, the metric against k beside the SFT-only curve, and the selected settings
with their gain over SFT-only and the TRL reward trends of the selected run.

A sweep group is the conditions of one task that agree on every field but the swept ones (`SWEPT`):
one per backbone × parameterization × data × decoding; its SFT-only condition is the reference.
k = 0 is DPO-only, k ≥ 1 is SFT@k→DPO. The best setting is chosen on the dev set it is scored on, so
its value is optimistic; the paired tests say which other settings the dev set cannot tell from it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import textwrap
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..config import SftdpoError
from ..stats import holm, paired_bootstrap, t_interval
from .figures import FONT, PANEL_H, _legend_below
from .results import (NON_CONDITION, Condition, StudyResults, _fmt_value, _mean, _relevant, best_of, metric_columns,
                      param_label)
from .table import MIN_SEEDS_FOR_INTERVAL, Cell, Table

SWEPT = ("regime", "handoff_epoch", "beta", "dpo_lr")
ALPHA = 0.05
N_BOOT = 1000
# TRL's logged DPO metrics, as the epoch rows keep them (train/<name>: the epoch's mean)
TRL_TRENDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected")
# a summary key's paired test (stats.paired_bootstrap); metrics without one get no test
_TESTED = {"dev/accuracy": "accuracy", "dev/macro_f1": "macro_f1", "dev/f1_positive": "f1_positive", "dev/chrf": "chrf"}


def hand_off(cfg: dict) -> int:
    """k: the epoch at which DPO takes over (0 for DPO-only)."""
    return 0 if cfg.get("regime") == "dpo" else int(cfg.get("handoff_epoch") or 0)


@functools.lru_cache(maxsize=4096)
def _irrelevant(cfg_json: str) -> frozenset[str]:
    cfg = json.loads(cfg_json)
    return frozenset(f for f in cfg if not _relevant(cfg, f))


def same_except(a: dict, b: dict, ignore: tuple[str, ...]) -> bool:
    """Whether two conditions agree on every field both can be affected by, `ignore` aside (an SFT-only
    run's DPO fields and a DPO-only run's SFT learning rate are reset, so they are not compared)."""
    skip = set(ignore) | set(NON_CONDITION) | _irrelevant(json.dumps(a, sort_keys=True, default=str)) \
        | _irrelevant(json.dumps(b, sort_keys=True, default=str))
    return all(a.get(f) == b.get(f) for f in (set(a) | set(b)) - skip)


@dataclass
class SweepGroup:
    task: str
    conds: list[Condition]

    @property
    def sft(self) -> Condition | None:
        return next((c for c in self.conds if c.cfg.get("regime") == "sft"), None)

    @property
    def dpo(self) -> list[Condition]:
        return [c for c in self.conds if c.cfg.get("regime") != "sft"]

    def axis(self, field: str) -> list:
        vals = {hand_off(c.cfg) if field == "k" else c.cfg.get(field) for c in self.dpo}
        return sorted(v for v in vals if v is not None)

    def cell(self, k: int, beta: float, lr: float) -> Condition | None:
        return next((c for c in self.dpo if hand_off(c.cfg) == k and c.cfg.get("beta") == beta
                     and c.cfg.get("dpo_lr") == lr), None)

    @property
    def title(self) -> str:
        c = self.conds[0].cfg
        return f"{c.get('model')}, {param_label(c)}"

    @property
    def slug(self) -> str:
        c = self.conds[0].cfg
        param = "fft" if c.get("param") == "fft" else f"lora{c.get('lora_rank')}"
        return re.sub(r"[^A-Za-z0-9.]+", "_", f"{self.task}_{c.get('model')}_{param}").strip("_")

    def is_sweep(self) -> bool:
        """Whether this group tries several DPO settings (β, DPO learning rate) at one hand-off k, or
        hands off at three or more points: the sweep sections are for it. A spec that gives each
        regime its own tuned DPO learning rate (quick) is not a sweep: its heat map would be all holes."""
        settings: dict = {}
        for c in self.dpo:
            settings.setdefault(hand_off(c.cfg), set()).add((c.cfg.get("beta"), c.cfg.get("dpo_lr")))
        return any(len(s) > 1 for s in settings.values()) or len(settings) > 2


def sweep_groups(study: StudyResults, task: str) -> list[SweepGroup]:
    """The task's headline conditions (StudyResults.main_conditions) grouped by every field but the swept ones."""
    groups: list[list[Condition]] = []
    for c in study.main_conditions(task):
        for g in groups:
            if all(same_except(c.cfg, o.cfg, SWEPT) for o in g):
                g.append(c)
                break
        else:
            groups.append([c])
    return [SweepGroup(task, g) for g in groups if any(c.cfg.get("regime") != "sft" for c in g)]


def study_sweeps(study: StudyResults) -> list[SweepGroup]:
    return [g for t in study.tasks() for g in sweep_groups(study, t) if g.is_sweep()]


def _pooled(study: StudyResults, c: Condition, seeds: list) -> list[tuple[str, str, str]]:
    by_seed = {r["config"].get("seed"): r for r in c.runs}
    return [(f"s{s}:{i}", p, ref) for s in seeds for i, p, ref in study.outputs(by_seed[s]["run_hash"])]


def paired(study: StudyResults, a: Condition, b: Condition, key: str) -> dict | None:
    """Paired bootstrap of `key` between two conditions over their shared seeds' dev examples (None when
    the metric has no test or no seed has dev outputs in both)."""
    metric = _TESTED.get(key)
    if metric is None:
        return None
    seeds_a = {r["config"].get("seed") for r in a.runs if study.outputs(r["run_hash"])}
    seeds_b = {r["config"].get("seed") for r in b.runs if study.outputs(r["run_hash"])}
    seeds = sorted(seeds_a & seeds_b, key=str)
    if not seeds:
        return None
    try:
        return paired_bootstrap(_pooled(study, a, seeds), _pooled(study, b, seeds), metric, n_boot=N_BOOT, seed=0)
    except SftdpoError:
        return None


def indistinguishable(study: StudyResults, conds: list[Condition], best: Condition, key: str) -> set[int] | None:
    """ids of the conditions a paired test cannot tell from `best` (Holm-adjusted p ≥ ALPHA over the
    family of comparisons with it), `best` included; None when the metric has no test."""
    others = [c for c in conds if c is not best and c.stat(key) is not None]
    results = [paired(study, c, best, key) for c in others]
    if _TESTED.get(key) is None or (others and all(r is None for r in results)):
        return None
    tested = [(c, r) for c, r in zip(others, results) if r is not None]
    adjusted = holm([r["p_value"] for _, r in tested])
    return {id(best)} | {id(c) for (c, _), p in zip(tested, adjusted) if p >= ALPHA}


# -- heat map -------------------------------------------------------------------------------------

def figure_heatmap(study: StudyResults, group: SweepGroup) -> Figure | None:
    """Rows: the task's dev metrics; columns: hand-off k; each panel the final dev metric (seed mean) over
    β (y) × DPO learning rate (x). Colour: diverging around the SFT-only value (blue above, red below);
    thick box: the best cell of the row; thin box: cells a paired test cannot tell from it; hatched: no run."""
    betas, lrs, ks = group.axis("beta"), group.axis("dpo_lr"), group.axis("k")
    metrics = [m for m in metric_columns(group.conds[0].cfg) if any(c.stat(m[0]) is not None for c in group.dpo)]
    if not metrics or not betas or not lrs:
        return None
    sft = group.sft
    with matplotlib.rc_context(FONT):
        pw = max(1.9, 0.55 * len(lrs) + 0.9)
        fig = Figure(figsize=(pw * len(ks) + 0.9, (max(1.5, 0.38 * len(betas) + 0.9)) * len(metrics) + 0.9),
                     layout="constrained")
        axes = fig.subplots(len(metrics), len(ks), squeeze=False, sharex=True, sharey=True)
        for i, (key, label, scale) in enumerate(metrics):
            grid = {k: np.full((len(betas), len(lrs)), np.nan) for k in ks}
            for c in group.dpo:
                m = _mean(c, key, scale)
                if m is not None:
                    grid[hand_off(c.cfg)][betas.index(c.cfg.get("beta")), lrs.index(c.cfg.get("dpo_lr"))] = m
            ref = _mean(sft, key, scale)
            values = [v for g in grid.values() for v in g.ravel() if not math.isnan(v)]
            lo, hi = min(values), max(values)
            if ref is not None:  # always diverging around SFT-only: all red says "every setting is below it"
                pad = 0.01 * (max(hi, ref) - min(lo, ref)) + 1e-6
                norm, cmap = TwoSlopeNorm(vcenter=ref, vmin=min(lo, ref - pad), vmax=max(hi, ref + pad)), "RdBu"
            else:
                norm, cmap = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9), "viridis"
            best = best_of(group.dpo, key, scale)
            near = indistinguishable(study, group.dpo, best, key) if best is not None else None
            for j, k in enumerate(ks):
                ax = axes[i][j]
                ax.add_patch(Rectangle((-0.5, -0.5), len(lrs), len(betas), facecolor="0.92", hatch="///",
                                       edgecolor="0.7", linewidth=0, zorder=0))
                im = ax.imshow(np.ma.masked_invalid(grid[k]), origin="lower", cmap=cmap, norm=norm, aspect="auto",
                               zorder=1)
                for bi, beta in enumerate(betas):
                    for li, lr in enumerate(lrs):
                        c = group.cell(k, beta, lr)
                        v = grid[k][bi, li]
                        if math.isnan(v):
                            ax.text(li, bi, "no run", ha="center", va="center", fontsize=6, color="0.35")
                            continue
                        rgba = im.cmap(im.norm(v))
                        dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                        ax.text(li, bi, f"{v:.1f}", ha="center", va="center", fontsize=6.5,
                                color="white" if dark else "black")
                        if c is best:
                            ax.add_patch(Rectangle((li - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="black",
                                                   linewidth=2.4, zorder=3, label="best"))
                        elif near is not None and id(c) in near:
                            ax.add_patch(Rectangle((li - 0.46, bi - 0.46), 0.92, 0.92, fill=False, edgecolor="black",
                                                   linewidth=0.9, zorder=3,
                                                   label=f"not distinguishable from best (Holm p ≥ {ALPHA:g})"))
                ax.set_xticks(range(len(lrs)), [_fmt_value(v) for v in lrs], rotation=30)
                ax.set_yticks(range(len(betas)), [_fmt_value(v) for v in betas])
                if i == 0:
                    ax.set_title("DPO-only (k=0)" if k == 0 else f"SFT@{k}→DPO (k={k})")
                if i == len(metrics) - 1:
                    ax.set_xlabel("DPO learning rate")
                if j == 0:
                    ax.set_ylabel(f"{label}\nβ")
            cb = fig.colorbar(im, ax=list(axes[i]), shrink=0.9, pad=0.02)
            cb.ax.tick_params(labelsize=6)
            if ref is not None:  # the SFT-only reference: a line on the colour bar, named in its label
                cb.ax.axhline(ref, color="black", linewidth=1.4)
                cb.set_label(f"line: SFT-only {ref:.1f}", fontsize=6)
        handles: dict[str, object] = {}
        for ax in axes.ravel():
            for p in ax.patches:
                if p.get_label() and not p.get_label().startswith("_"):
                    handles.setdefault(p.get_label(), p)
        seeds = sorted({len(c.runs) for c in group.dpo})
        n = f"n={seeds[0]} seed{'s' if seeds[0] > 1 else ''} per cell" if len(seeds) == 1 else \
            f"n={min(seeds)}–{max(seeds)} seeds per cell"
        fig.suptitle(textwrap.fill(f"{group.task}, {group.title}: final dev metric over β × DPO learning rate ({n})",
                                   int(fig.get_figwidth() * 14)))
        if handles:
            _legend_below(fig, list(handles.values()), list(handles), max_cols=2)
        return fig


# -- metric against hand-off k ----------------------------------------------------------------------

def _seed_band(ax, x: float, c: Condition, key: str, scale: float, color: str) -> None:
    vals = [v for v in c.values(key, scale) if v is not None]
    if len(vals) >= MIN_SEEDS_FOR_INTERVAL:
        _, _, lo, hi = t_interval(vals)
        ax.errorbar([x], [float(np.mean(vals))], yerr=[[np.mean(vals) - lo], [hi - np.mean(vals)]], color=color,
                    capsize=2, linewidth=0.9)
    elif len(vals) == 2:
        ax.plot([x, x], vals, linestyle="none", marker="_", markersize=6, color=color)


def figure_handoff_k(study: StudyResults, task: str, groups: list[SweepGroup]) -> Figure | None:
    """Rows: dev metrics; columns: sweep groups. Final dev metric against the hand-off epoch k at the best
    (β, DPO lr) of each k and at the best setting overall, with the SFT-only run's dev curve (its epoch-k
    model is the hand-off model) and its final value."""
    groups = [g for g in groups if len(g.axis("k")) > 1]
    if not groups:
        return None
    metrics = [m for m in metric_columns(groups[0].conds[0].cfg)
               if any(c.stat(m[0]) is not None for g in groups for c in g.dpo)]
    if not metrics:
        return None
    with matplotlib.rc_context(FONT):
        fig = Figure(figsize=(3.3 * len(groups), PANEL_H * len(metrics) + 0.8), layout="constrained")
        axes = fig.subplots(len(metrics), len(groups), squeeze=False, sharey="row", sharex=True)
        for j, g in enumerate(groups):
            ks = g.axis("k")
            for i, (key, label, scale) in enumerate(metrics):
                ax = axes[i][j]
                per_k = [best_of([c for c in g.dpo if hand_off(c.cfg) == k], key, scale) for k in ks]
                pts = [(k, c) for k, c in zip(ks, per_k) if c is not None]
                ax.plot([k for k, _ in pts], [_mean(c, key, scale) for _, c in pts], marker="o", markersize=3,
                        color="#d62728", linewidth=1.4, label="best β, DPO lr at each k")
                for k, c in pts:
                    _seed_band(ax, k, c, key, scale, "#d62728")
                overall = best_of(g.dpo, key, scale)
                if overall is not None and (len(g.axis("beta")) > 1 or len(g.axis("dpo_lr")) > 1):
                    beta, lr = overall.cfg.get("beta"), overall.cfg.get("dpo_lr")
                    same = [(k, g.cell(k, beta, lr)) for k in ks]
                    same = [(k, c) for k, c in same if c is not None and _mean(c, key, scale) is not None]
                    ax.plot([k for k, _ in same], [_mean(c, key, scale) for _, c in same], marker="s", markersize=2.5,
                            color="#9467bd", linestyle="--", linewidth=1.1,
                            label="the best setting overall at every k (per metric)")
                sft = g.sft
                if sft is not None:
                    curves = [study.curve(r, key, scale) for r in sft.runs]
                    epochs = sorted({e for cv in curves for e in cv})
                    if epochs:
                        ax.plot(epochs, [float(np.mean([cv[e] for cv in curves if e in cv])) for e in epochs],
                                color="#1f77b4", linewidth=1.1, marker=".", markersize=3,
                                label="SFT-only dev curve (epoch k = the hand-off model)")
                    final = _mean(sft, key, scale)
                    if final is not None:
                        ax.axhline(final, color="#1f77b4", linestyle=":", linewidth=1.0, label="SFT-only, final epoch")
                ax.grid(alpha=0.3)
                ax.xaxis.get_major_locator().set_params(integer=True)
                if j == 0:
                    ax.set_ylabel(label)
                if i == 0:
                    ax.set_title(g.title)
                if i == len(metrics) - 1:
                    ax.set_xlabel("hand-off epoch k (0 = DPO-only)")
        handles: dict[str, object] = {}
        for ax in axes.ravel():
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.suptitle(textwrap.fill(f"{task}: final dev metric against the hand-off epoch k", 48 * len(groups)))
        _legend_below(fig, list(handles.values()), list(handles), max_cols=2)
        return fig


# -- selected settings -------------------------------------------------------------------------------

def trend(study: StudyResults, c: Condition, name: str) -> str:
    """`first → last` of a TRL metric's epoch means over the DPO epochs (seed mean per epoch)."""
    per_epoch: dict[int, list[float]] = {}
    for r in c.runs:
        for e in study.epochs(r["run_hash"]):
            v = e["metrics"].get(f"train/{name}")
            if e["stage"] == "dpo" and v is not None:
                per_epoch.setdefault(int(e["epoch"]), []).append(float(v))
    if not per_epoch:
        return ""
    first, last = per_epoch[min(per_epoch)], per_epoch[max(per_epoch)]
    return f"{np.mean(first):.2f} → {np.mean(last):.2f}"


def setting_label(cfg: dict) -> str:
    k = hand_off(cfg)
    regime = "DPO-only" if k == 0 else f"SFT@{k}→DPO"
    return f"{regime}, β={_fmt_value(cfg.get('beta'))}, DPO lr={_fmt_value(cfg.get('dpo_lr'))}"


def table_selected(study: StudyResults, groups: list[SweepGroup]) -> Table | None:
    """Per sweep group and dev metric: the best DPO setting (β, DPO lr, k), its value and gain over
    SFT-only with a paired test, and how TRL's rewards and log-probs moved over its DPO epochs."""
    rows: list[list[Cell]] = []
    p_rows: list[tuple[int, float]] = []
    for g in groups:
        for key, label, scale in metric_columns(g.conds[0].cfg):
            best = best_of(g.dpo, key, scale)
            if best is None:
                continue
            sft = g.sft
            delta, p = "", ""
            if sft is not None and sft.stat(key) is not None:
                res = paired(study, best, sft, key)
                if res is not None:
                    delta = f"{res['delta'] * scale:+.2f} [{res['ci_lo'] * scale:+.2f}, {res['ci_hi'] * scale:+.2f}]"
                    p = f"{res['p_value']:.4f}"
                    p_rows.append((len(rows), res["p_value"]))
                else:
                    delta = f"{best.stat(key, scale).mean - sft.stat(key, scale).mean:+.2f} (untested)"
            rows.append([g.task, g.title, label, setting_label(best.cfg), best.stat(key, scale),
                         sft.stat(key, scale) if sft is not None else None, delta, p, "",
                         *(trend(study, best, t) for t in TRL_TRENDS)])
    if not rows:
        return None
    for (i, _), ph in zip(p_rows, holm([p for _, p in p_rows])):
        rows[i][8] = f"{ph:.4f}"
    return Table("table_selected", "Selected DPO settings: the best β, DPO learning rate and hand-off k per metric",
                 ["Task", "Group", "Selected on", "Setting", "Dev (selected)", "Dev (SFT-only)",
                  "Δ vs SFT-only [95% CI]", "p", "p_Holm", *TRL_TRENDS], rows,
                 ["Selected on the dev set it is scored on: an optimistic estimate of the setting's value (a held-out "
                  "split would be needed for an unbiased one). Δ: paired bootstrap over the dev examples of shared "
                  f"seeds ({N_BOOT} resamples); p_Holm over the table's tests.",
                  "TRL's metrics of the selected run, first → last DPO epoch (epoch means, seed mean): rewards = "
                  "β·(log π − log π_ref) of the chosen/rejected answer; margins = chosen − rejected; accuracies = "
                  "share of pairs with chosen reward > rejected. A falling chosen reward with a growing margin is "
                  "the usual DPO pattern: both log-probs fall, the rejected one faster."]).drop_empty("p", "p_Holm")


def sweep_summary(group: SweepGroup) -> str:
    """One sentence: what the group's sweep covers."""
    parts = [f"β ∈ {{{', '.join(_fmt_value(v) for v in group.axis('beta'))}}}",
             f"DPO lr ∈ {{{', '.join(_fmt_value(v) for v in group.axis('dpo_lr'))}}}",
             f"k ∈ {{{', '.join(str(v) for v in group.axis('k'))}}}"]
    n_cells = len(group.axis("beta")) * len(group.axis("dpo_lr")) * len(group.axis("k"))
    missing = n_cells - len(group.dpo)
    return (f"{group.task}, {group.title}: " + " × ".join(parts) + f" ({len(group.dpo)} of {n_cells} settings run"
            + (f", {missing} missing" if missing > 0 else "") + "); SFT-only reference: "
            + ("yes" if group.sft is not None else "none") + ".")

