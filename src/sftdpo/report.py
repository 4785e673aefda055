"""Paper-style report of a study: tables (Markdown, CSV, LaTeX), figures and significance tests,
all read from study_dir/study.db.

Seeds of one condition are pooled into mean ± std with a bootstrap interval; differences between
conditions are tested with paired bootstraps over dev examples. Paper numbers are shown only when
the backbone is the paper's (GPT-2), because on another backbone a difference means nothing.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .config import DECODING_FIELDS, DPO_FIELDS, LORA_FIELDS, SftdpoError
from .stats import bootstrap_ci, paired_bootstrap
from .store import Store

# Reference numbers from arXiv 2603.20100 (GPT-2 backbone), in display units (percent, chrF).
# "match" selects our conditions by config fields; a tuple lists accepted values.
PAPER: dict[str, Any] = {
    "backbone": "gpt2",
    "paraphrase": [
        {"match": {"regime": "sft", "param": "fft"}, "dev/accuracy": 89.87, "dev/macro_f1": 89.21},
        {"match": {"regime": "sft-dpo", "handoff_epoch": 9, "param": "fft"}, "dev/accuracy": 90.05, "dev/macro_f1": 89.43},
        {"match": {"regime": "sft", "param": "lora", "lora_rank": 8}, "dev/accuracy": 87.70, "dev/macro_f1": 87.00},
    ],
    # sonnet values are (lo, hi) ranges; the paper's sonnet runs are full fine-tuning
    "sonnet": [
        {"match": {"regime": "sft", "param": "fft"}, "dev/chrf": (41.29, 41.29)},
        {"match": {"regime": ("dpo", "sft-dpo"), "param": "fft", "pairs": "v1"}, "dev/chrf": (41.5, 41.9)},
    ],
}

# (summary key, column title, scale to display units)
TASK_METRICS = {
    "paraphrase": [("dev/accuracy", "Accuracy (%)", 100.0), ("dev/macro_f1", "Macro-F1 (%)", 100.0)],
    "sonnet": [("dev/chrf", "chrF (full)", 1.0), ("dev/chrf_continuation", "chrF (continuation)", 1.0)],
}
PRIMARY = {"paraphrase": ("dev/accuracy", "dev accuracy (%)", 100.0), "sonnet": ("dev/chrf", "dev chrF", 1.0)}
# stats.paired_bootstrap metric, summary key for the label, scale
TEST_METRICS = {"paraphrase": [("accuracy", "accuracy (%)", 100.0), ("macro_f1", "macro-F1 (%)", 100.0)],
                "sonnet": [("chrf", "chrF", 1.0)]}

NON_CONDITION = ("seed", "log_every", "eval_batch_size")
DPO_FIELDS, LORA_FIELDS, DECODING_FIELDS = set(DPO_FIELDS), set(LORA_FIELDS), set(DECODING_FIELDS)
REGIME_ORDER = {"sft": 0, "dpo": 1, "sft-dpo": 2}


# -- labels ------------------------------------------------------------------------------------

def regime_label(cfg: dict) -> str:
    r = cfg.get("regime")
    return {"sft": "SFT", "dpo": "DPO-only"}.get(r) or f"SFT@{cfg.get('handoff_epoch')}→DPO"


def param_label(cfg: dict) -> str:
    return "FFT" if cfg.get("param") == "fft" else f"LoRA r={cfg.get('lora_rank')}"


def _relevant(cfg: dict, f: str) -> bool:
    """Whether a config field can matter for this run (pairs for SFT or LoRA rank for FFT cannot)."""
    if f in DPO_FIELDS:
        return cfg.get("regime") != "sft"
    if f == "lr":  # the SFT learning rate; DPO-only runs have no SFT stage
        return cfg.get("regime") != "dpo"
    if f in LORA_FIELDS:
        return cfg.get("param") == "lora"
    if f in DECODING_FIELDS:
        return cfg.get("task") == "sonnet"
    return True


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sort_key(cfg: dict) -> tuple:
    return (cfg.get("task", ""), str(cfg.get("model", "")), REGIME_ORDER.get(cfg.get("regime"), 9),
            cfg.get("handoff_epoch") or 0, cfg.get("param") != "fft",
            cfg.get("lora_rank") if cfg.get("param") == "lora" else 0,
            str(cfg.get("pairs")) if cfg.get("regime") != "sft" else "",
            json.dumps(cfg, sort_keys=True, default=str))


# -- cells and tables --------------------------------------------------------------------------

@dataclass
class Stat:
    """One table cell over seeds: mean ± std [95% bootstrap CI] (n=k), or value (n=1)."""

    values: list[float]
    decimals: int = 2

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    def ci(self) -> tuple[float, float, float, float]:
        return bootstrap_ci(self.values)

    def __str__(self) -> str:
        d = self.decimals
        if len(self.values) == 1:
            return f"{self.values[0]:.{d}f} (n=1)"
        m, s, lo, hi = self.ci()
        return f"{m:.{d}f} ± {s:.{d}f} [{lo:.{d}f}, {hi:.{d}f}] (n={len(self.values)})"


def _stat(values: list[float | None], decimals: int = 2) -> Stat | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return Stat(vals, decimals) if vals else None


Cell = str | Stat | None


@dataclass
class Table:
    slug: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)

    def drop_empty(self, *names: str) -> "Table":
        """Remove the named columns where no row has anything to say."""
        for name in names:
            if name in self.columns:
                j = self.columns.index(name)
                if all(r[j] in (None, "") for r in self.rows):
                    self.columns.pop(j)
                    for r in self.rows:
                        r.pop(j)
        return self

    def markdown(self) -> str:
        def cell(c: Cell) -> str:
            return ("—" if c is None or c == "" else str(c)).replace("|", "\\|")
        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in self.rows]
        out += [""] + [f"_{n}_  " for n in self.notes]
        out.append(f"Files: `{self.slug}.csv`, `{self.slug}.tex`")
        return "\n".join(out)

    def write_csv(self, path: Path) -> None:
        """Stat columns become mean/std/ci_lo/ci_hi/n columns so the CSV stays numeric."""
        stat_cols = {j for j in range(len(self.columns)) if any(isinstance(r[j], Stat) for r in self.rows)}
        header: list[str] = []
        for j, c in enumerate(self.columns):
            header += [f"{c} {s}" for s in ("mean", "std", "ci_lo", "ci_hi", "n")] if j in stat_cols else [c]
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for r in self.rows:
                row: list[Any] = []
                for j, c in enumerate(r):
                    if j not in stat_cols:
                        row.append("" if c is None else str(c))
                    elif isinstance(c, Stat):
                        m, s, lo, hi = c.ci()
                        row += [round(m, 6), round(s, 6), round(lo, 6), round(hi, 6), len(c.values)]
                    else:
                        row += ["", "", "", "", 0]
                w.writerow(row)

    def write_tex(self, path: Path) -> None:
        body = [" & ".join(_tex(c) for c in self.columns) + r" \\", r"\midrule"]
        body += [" & ".join(_tex("--" if c is None or c == "" else str(c)) for c in r) + r" \\" for r in self.rows]
        notes = "".join(f"\n\\par\\smallskip{{\\footnotesize {_tex(n)}}}" for n in self.notes)
        path.write_text(
            "% generated by sftdpo report; needs \\usepackage{booktabs}\n"
            f"\\begin{{table}}[ht]\n\\centering\n\\caption{{{_tex(self.title)}}}\n\\label{{tab:{self.slug}}}\n"
            f"\\resizebox{{\\linewidth}}{{!}}{{%\n\\begin{{tabular}}{{{'l' * len(self.columns)}}}\n\\toprule\n"
            + "\n".join(body) + f"\n\\bottomrule\n\\end{{tabular}}}}{notes}\n\\end{{table}}\n", encoding="utf-8")


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
        "±": r"$\pm$", "Δ": r"$\Delta$", "→": r"$\rightarrow$", "–": "--", "—": "---", "−": "$-$",
        "≤": r"$\le$", "≥": r"$\ge$", "·": r"$\cdot$", "×": r"$\times$", "≈": r"$\approx$", "⏎": " "}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


# -- study data --------------------------------------------------------------------------------

@dataclass
class Condition:
    """All done runs sharing every config field except the seed."""

    cfg: dict
    runs: list[dict]

    @property
    def task(self) -> str:
        return self.cfg.get("task", "")

    def values(self, key: str, scale: float = 1.0) -> list[float | None]:
        return [None if (r["summary"] or {}).get(key) is None else r["summary"][key] * scale for r in self.runs]

    def stat(self, key: str, scale: float = 1.0, decimals: int = 2) -> Stat | None:
        return _stat(self.values(key, scale), decimals)


def _cond_key(cfg: dict, drop: tuple[str, ...] = ()) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k not in NON_CONDITION + drop}, sort_keys=True, default=str)


class Study:
    """The store's contents grouped for reporting; epochs and dev outputs are read lazily."""

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
    """Config fields that vary among these conditions and are not already columns, per condition."""
    fields = sorted({k for c in conds for k in c.cfg} - shown - set(NON_CONDITION))
    varying = [f for f in fields if len({json.dumps(c.cfg.get(f), default=str) for c in conds}) > 1]
    return {id(c): ", ".join(f"{f}={_fmt_value(c.cfg.get(f))}" for f in varying if _relevant(c.cfg, f))
            for c in conds}


SHOWN = {"task", "model", "regime", "handoff_epoch", "param", "lora_rank"}


# -- paper reference ---------------------------------------------------------------------------

def _paper_entry(task: str, cfg: dict) -> dict | None:
    for entry in PAPER.get(task, []):
        ok = all(cfg.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in entry["match"].items())
        if ok:
            return entry
    return None


def _paper_cells(task: str, cond: Condition, keys: list[tuple[str, str, float]]) -> tuple[str, str]:
    """(paper value(s), ours − paper) for one row; n/a off the paper's backbone."""
    model = cond.cfg.get("model")
    if model != PAPER["backbone"]:
        return f"n/a (backbone {model}, paper: {PAPER['backbone']})", "n/a"
    entry = _paper_entry(task, cond.cfg)
    if entry is None:
        return "—", "—"
    refs, deltas = [], []
    for key, _, scale in keys:
        ref = entry.get(key)
        if ref is None:
            continue
        ours = cond.stat(key, scale)
        if isinstance(ref, tuple):
            lo, hi = ref
            refs.append(f"{lo:.2f}" if lo == hi else f"{lo:g}–{hi:g}")
            if ours is None:
                deltas.append("—")
            else:
                m = ours.mean
                d = m - lo if m < lo else m - hi if m > hi else 0.0
                deltas.append(f"{d:+.2f}" + (" (within range)" if lo != hi and lo <= m <= hi else ""))
        else:
            refs.append(f"{ref:.2f}")
            deltas.append("—" if ours is None else f"{ours.mean - ref:+.2f}")
    return " / ".join(refs), " / ".join(deltas)


# -- tables ------------------------------------------------------------------------------------

def untrained_rows(conds: list[Condition], keys: list[tuple[str, str, float]], blanks: int) -> list[list[Cell]]:
    """One row per backbone: its dev metrics before training (epoch 0, `init/...` in the summaries;
    the same for every run of a backbone on the same dev set and decoding), the baseline to beat."""
    rows = []
    for model in dict.fromkeys(c.cfg.get("model") for c in conds):
        c = next((c for c in conds if c.cfg.get("model") == model and c.stat(f"init/{keys[0][0]}") is not None), None)
        if c is not None:
            rows.append([model, "untrained (epoch 0)", *[""] * blanks, *(c.stat(f"init/{k}", s) for k, _, s in keys)])
    return rows


def table_a(study: Study) -> Table | None:
    conds = study.main_conditions("paraphrase")
    if not conds:
        return None
    keys = TASK_METRICS["paraphrase"]
    sett = _settings(conds, SHOWN)
    rows = [r + ["", ""] for r in untrained_rows(conds, keys, 2)]
    for c in conds:
        paper, delta = _paper_cells("paraphrase", c, keys)
        rows.append([c.cfg.get("model"), regime_label(c.cfg), param_label(c.cfg), sett[id(c)],
                     *(c.stat(k, s) for k, _, s in keys), paper, delta])
    frac = conds[0].cfg.get("data_fraction", 1.0)
    return Table("table_a_paraphrase", "Table A: paraphrase detection (QQP dev) by regime × parameterization",
                 ["Model", "Regime", "Param", "Setting", *(t for _, t, _ in keys), "Paper acc / F1", "Δ acc / F1 (ours − paper)"],
                 rows, [f"Final-epoch dev metrics, data fraction {frac:g}; mean ± std [95% bootstrap CI over seeds] (n seeds).",
                        "Paper numbers (GPT-2) shown only for the gpt2 backbone; Δ uses our seed mean."]).drop_empty("Setting")


def _sonnet_rows(study: Study, conds: list[Condition], with_temp: bool) -> tuple[list[list[Cell]], list[str]]:
    keys = TASK_METRICS["sonnet"]
    shown = SHOWN | {"pairs"} | ({"temperature"} if with_temp else set())
    sett = _settings(conds, shown)
    rows = [] if with_temp else [r + ["", ""] for r in untrained_rows(conds, keys, 3)]
    for c in conds:
        pairs = c.cfg.get("pairs", "") if c.cfg.get("regime") != "sft" else "—"
        row: list[Cell] = [c.cfg.get("model"), regime_label(c.cfg), pairs, param_label(c.cfg), sett[id(c)]]
        if with_temp:
            row.append(_fmt_value(c.cfg.get("temperature")))
        row += [c.stat(k, s) for k, _, s in keys]
        if not with_temp:
            row += list(_paper_cells("sonnet", c, keys[:1]))
        rows.append(row)
    return rows, [t for _, t, _ in keys]


def table_b(study: Study) -> list[Table]:
    conds = study.main_conditions("sonnet")
    if not conds:
        return []
    temp = study.reference_temperature()
    rows, titles = _sonnet_rows(study, conds, with_temp=False)
    temps = sorted({c.cfg.get("temperature") for c in study.task_conditions("sonnet")})
    notes = ["chrF (full): generated full sonnet vs the true sonnet (CS224N convention); chrF (continuation): "
             "only the generated lines after the prompt. sacreBLEU chrF defaults, final epoch.",
             f"Decoding temperature {_fmt_value(temp)}" + ("; other temperatures in Table B2." if len(temps) > 1 else "."),
             "Pairs: DPO preference-pair construction (not used by SFT). Paper numbers (GPT-2) only for the gpt2 backbone; "
             "Δ vs a range is the distance to its nearest end (0 inside)."]
    out = [Table("table_b_sonnet", "Table B: sonnet continuation chrF by regime × pair construction",
                 ["Model", "Regime", "Pairs", "Param", "Setting", *titles, "Paper chrF", "Δ chrF (ours − paper)"],
                 rows, notes).drop_empty("Setting")]
    if len(temps) > 1:
        top = max(c.cfg.get("data_fraction", 1.0) for c in study.task_conditions("sonnet"))
        allc = [c for c in study.task_conditions("sonnet") if c.cfg.get("data_fraction", 1.0) == top]
        allc.sort(key=lambda c: (_sort_key({**c.cfg, "temperature": 0}), c.cfg.get("temperature")))
        rows2, titles2 = _sonnet_rows(study, allc, with_temp=True)
        out.append(Table("table_b2_sonnet_temperature", "Table B2: sonnet chrF by decoding temperature",
                         ["Model", "Regime", "Pairs", "Param", "Setting", "Temperature", *titles2], rows2,
                         ["Same runs' settings as Table B, one row per decoding temperature."]).drop_empty("Setting"))
    return out


def table_handoff(study: Study) -> Table | None:
    rows: list[list[Cell]] = []
    for task in ("paraphrase", "sonnet"):
        conds = study.main_conditions(task)
        key, label, scale = PRIMARY[task]
        sett = _settings(conds, SHOWN)
        for c in conds:
            bests = [study.best(r, key, scale) for r in c.runs]
            finals = c.values(key, scale)
            gaps = [None if f is None or b[0] is None else f - b[0] for f, b in zip(finals, bests)]
            rows.append([task, c.cfg.get("model"), param_label(c.cfg), regime_label(c.cfg), sett[id(c)], label,
                         _stat([b[0] for b in bests]), _stat([b[1] for b in bests], 1), _stat(finals), _stat(gaps)])
    if not rows:
        return None
    return Table("table_handoff", "Hand-off: best and final dev metric per regime",
                 ["Task", "Model", "Param", "Regime", "Setting", "Metric", "Best", "Best epoch", "Final", "Final − best"],
                 rows, ["Best: best dev value over epochs (per seed, then pooled); epochs count across the whole run, "
                        "so SFT@k→DPO switches to DPO after epoch k."]).drop_empty("Setting")


def table_cost(study: Study) -> Table | None:
    rows: list[list[Cell]] = []
    for task in ("paraphrase", "sonnet"):
        conds = study.main_conditions(task)
        sett = _settings(conds, SHOWN)
        for c in conds:
            s0 = c.runs[0]["summary"]
            tp, tot = s0.get("trainable_params"), s0.get("total_params")
            params = "—" if tp is None else f"{tp:,}" + (f" ({100 * tp / tot:.2f}%)" if tot else "")
            rows.append([task, c.cfg.get("model"), regime_label(c.cfg), param_label(c.cfg), sett[id(c)],
                         c.stat("wall_clock_per_epoch_s", 1, 1), c.stat("train_tokens_per_s", 1, 0),
                         c.stat("peak_memory_mb", 1, 0), params])
    if not rows:
        return None
    devices = sorted({str((r["env"] or {}).get("device")) for r in study.done if (r["env"] or {}).get("device")})
    return Table("table_cost", "Cost per regime × parameterization",
                 ["Task", "Model", "Regime", "Param", "Setting", "Wall-clock / epoch (s)", "Train tokens/s",
                  "Peak memory (MB)", "Trainable params (% of total)"], rows,
                 ["Wall-clock per epoch: mean over trained epochs (training only). Device(s): "
                  + (", ".join(devices) or "not recorded") + "."]).drop_empty("Setting")


def table_data_scale(study: Study) -> Table | None:
    rows: list[list[Cell]] = []
    budgets = []
    for task in ("paraphrase", "sonnet"):
        key, label, scale = PRIMARY[task]
        conds = study.task_conditions(task)
        if task == "sonnet":
            conds = [c for c in conds if c.cfg.get("temperature") == study.reference_temperature()]
        fams: dict[str, list[Condition]] = defaultdict(list)
        for c in conds:
            fams[_cond_key(c.cfg, ("data_fraction",))].append(c)
        fams = {k: sorted(v, key=lambda c: c.cfg.get("data_fraction", 1.0)) for k, v in fams.items() if len(v) > 1}
        if not fams:
            continue
        sett = _settings([c for v in fams.values() for c in v], SHOWN | {"data_fraction"})
        for fam in fams.values():
            totals = {id(c): [w[-1][1] if (w := study.cumulative_wall(r)) else (r["summary"].get("wall_clock_s") or 0.0)
                              for r in c.runs] for c in fam}
            budget = min(max(t) for t in totals.values())  # a fraction's total = its slowest seed's
            budgets.append(budget)
            for c in fam:
                at_time, reached = [], []
                for r in c.runs:
                    curve, wall = study.curve(r, key, scale), dict(study.cumulative_wall(r))
                    ok = [e for e in curve if wall.get(e, math.inf) <= budget + 1e-9]
                    at_time.append(curve[max(ok)] if ok else None)
                    reached.append(max(ok) if ok else None)
                rows.append([task, c.cfg.get("model"), regime_label(c.cfg), param_label(c.cfg), sett[id(c)],
                             _fmt_value(c.cfg.get("data_fraction", 1.0)), c.stat("train_examples", 1, 0),
                             label, _fmt_value(c.cfg.get("epochs")), c.stat(key, scale), _stat(totals[id(c)], 1),
                             f"{budget:.1f}", _stat(at_time), _stat(reached, 1)])
    if not rows:
        return None
    return Table("table_data_scale", "Data scale: dev metric vs training-data fraction",
                 ["Task", "Model", "Regime", "Param", "Setting", "Data fraction", "Train examples", "Metric", "Epochs",
                  "At equal epochs", "Total train time (s)", "Time budget T (s)", "At equal time", "Epoch reached"], rows,
                 ["At equal epochs: final dev metric after the same number of epochs for every fraction.",
                  "At equal time: for each fraction, the dev metric at the last epoch whose cumulative training "
                  "wall-clock (sum of per-epoch wall_s) is ≤ T, where T is the smallest total wall-clock among the "
                  "fractions compared (a fraction's total = its slowest seed's), so the fastest fraction is read at its "
                  "final epoch. A run with no epoch inside T (and no epoch-0 evaluation) is left out of that cell."]
                 ).drop_empty("Setting")


# -- key comparisons ---------------------------------------------------------------------------

BASE_MATCH = ("task", "model", "epochs", "data_fraction", "temperature")


def _pkey(cfg: dict) -> tuple:
    return (cfg.get("param"), cfg.get("lora_rank") if cfg.get("param") == "lora" else None)


def _comparison_pairs(study: Study) -> list[tuple[str, Condition, Condition]]:
    """(label, A, B) pairs for the three headline questions; A − B is tested."""
    conds = study.main_conditions("paraphrase") + study.main_conditions("sonnet")
    base = lambda c, drop=(): tuple(c.cfg.get(k) for k in BASE_MATCH if k not in drop)  # noqa: E731
    dpo_setting = lambda c: (c.cfg.get("pairs"), c.cfg.get("beta")) if c.cfg.get("regime") != "sft" else None  # noqa: E731
    out = []
    for a in conds:
        for b in conds:
            if a is b:
                continue
            ra, rb = a.cfg.get("regime"), b.cfg.get("regime")
            if (a.cfg.get("param") == "fft" and b.cfg.get("param") == "lora" and base(a) == base(b)
                    and ra == rb and a.cfg.get("handoff_epoch") == b.cfg.get("handoff_epoch")
                    and dpo_setting(a) == dpo_setting(b)):
                out.append((f"FFT vs {param_label(b.cfg)} ({regime_label(a.cfg)})", a, b))
            elif ra == "dpo" and rb == "sft" and base(a) == base(b) and _pkey(a.cfg) == _pkey(b.cfg):
                out.append((f"DPO-only vs SFT ({param_label(a.cfg)})", a, b))
    for a in conds:
        if a.cfg.get("regime") != "sft-dpo":
            continue
        sfts = [b for b in conds if b.cfg.get("regime") == "sft" and _pkey(a.cfg) == _pkey(b.cfg)
                and base(a, ("epochs",)) == base(b, ("epochs",))]
        same = [b for b in sfts if b.cfg.get("epochs") == a.cfg.get("epochs")]
        for b in same or [b for b in sfts if b.cfg.get("epochs") == a.cfg.get("handoff_epoch")]:
            note = "" if same else f", SFT at its {b.cfg.get('epochs')} epochs"
            out.append((f"{regime_label(a.cfg)} vs SFT ({param_label(a.cfg)}{note})", a, b))
    return sorted(out, key=lambda t: (t[1].task, t[1].cfg.get("model", ""), t[0]))


def _pooled_outputs(study: Study, cond: Condition, seeds: list) -> list[tuple[str, str, str]]:
    by_seed = {r["config"].get("seed"): r for r in cond.runs}
    return [(f"s{s}:{i}", p, ref) for s in seeds for i, p, ref in study.outputs(by_seed[s]["run_hash"])]


def table_comparisons(study: Study) -> tuple[Table | None, list[str]]:
    rows: list[list[Cell]] = []
    skipped: list[str] = []
    sett = {k: v for t in ("paraphrase", "sonnet") for k, v in _settings(study.main_conditions(t), SHOWN).items()}
    for label, a, b in _comparison_pairs(study):
        setting = "" if not (sett[id(a)] or sett[id(b)]) else f"A: {sett[id(a)] or '—'}; B: {sett[id(b)] or '—'}"
        seeds_a = {r["config"].get("seed") for r in a.runs if study.outputs(r["run_hash"])}
        seeds_b = {r["config"].get("seed") for r in b.runs if study.outputs(r["run_hash"])}
        seeds = sorted(seeds_a & seeds_b, key=str)
        if not seeds:
            skipped.append(f"{a.task}: {label}: no seed with dev outputs in both")
            continue
        oa, ob = _pooled_outputs(study, a, seeds), _pooled_outputs(study, b, seeds)
        for metric, mlabel, scale in TEST_METRICS[a.task]:
            try:
                res = paired_bootstrap(oa, ob, metric, n_boot=1000, seed=0)
            except SftdpoError as e:
                skipped.append(f"{a.task}: {label}: {e}")
                break
            rows.append([a.task, a.cfg.get("model"), label, setting, mlabel, f"{res['delta'] * scale:+.2f}",
                         f"[{res['ci_lo'] * scale:+.2f}, {res['ci_hi'] * scale:+.2f}]", f"{res['p_value']:.4f}",
                         str(res["n"]), ",".join(str(s) for s in seeds)])
    if not rows:
        return None, skipped
    return Table("table_comparisons", "Key comparisons: paired bootstrap over dev examples (A − B)",
                 ["Task", "Model", "Comparison (A vs B)", "Setting", "Metric", "Δ (A − B)", "95% CI", "p", "n examples", "Seeds"],
                 rows, ["The paper reports no significance tests; these are ours. Runs of A and B with the same seed are "
                        "paired and their dev examples pooled (ids prefixed by seed); 1000 resamples of examples; "
                        "two-sided p = 2·min(P(Δ* ≤ 0), P(Δ* ≥ 0)), floored at 1/1001; no multiple-comparison correction."]
                 ).drop_empty("Setting"), skipped


# -- figures -----------------------------------------------------------------------------------

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
_REGIME_COLORS = {"sft": "#1f77b4", "dpo": "#d62728", "sft-dpo": "#2ca02c"}


def _new_figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's global state
    from matplotlib.figure import Figure

    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _plot_condition(study: Study, ax, cond: Condition, key: str, scale: float, label: str, **style) -> None:
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


def figure_handoff(study: Study, task: str, path: Path) -> bool:
    conds = study.main_conditions(task)
    key, ylabel, scale = PRIMARY[task]
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


def figure_fft_vs_lora(study: Study, task: str, path: Path) -> bool:
    conds = study.main_conditions(task)
    key, ylabel, scale = PRIMARY[task]
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


# -- report ------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _fmt_value(v)
    return out


def _runs_section(study: Study) -> list[str]:
    counts = study.store.status_counts()
    out = ["## Runs", "", " · ".join(f"{s}: {n}" for s, n in counts.items()), ""]
    failed = [r for r in study.all_runs if r["status"] == "failed"]
    if failed:
        out += ["Failed runs:", "", "| Run | Hash | Error |", "|---|---|---|"]
        for r in failed:
            err = (r["error"] or "(no error recorded)").strip().replace("\n", " ⏎ ").replace("|", "\\|")
            out.append(f"| {r['name']} | `{r['run_hash']}` | {err} |")
        out.append("")
    for status in ("pending", "running"):
        names = [r["name"] for r in study.all_runs if r["status"] == status]
        if names:
            out += [f"{status.capitalize()} runs: " + ", ".join(names), ""]
    return out


def _setup_section(study: Study) -> list[str]:
    out = ["## Setup", ""]
    models = Counter(str(r["config"].get("model")) for r in study.all_runs)
    out.append("Models: " + (", ".join(f"{m} ({n} runs)" for m, n in sorted(models.items())) or "none"))
    sources = Counter(str(r["summary"].get("sonnet_source")) for r in study.done
                      if r["config"].get("task") == "sonnet" and r["summary"].get("sonnet_source"))
    if any(r["config"].get("task") == "sonnet" for r in study.done):
        out.append("Sonnet source(s): " + (", ".join(f"{s} ({n} runs)" for s, n in sorted(sources.items()))
                                           or "not recorded"))
    out += ["", "Environment (from finished runs):", ""]
    envs: dict[str, Counter] = defaultdict(Counter)
    for r in study.done:
        for k, v in _flatten(r["env"] or {}).items():
            envs[k][v] += 1
    if envs:
        out += ["| Key | Value(s) |", "|---|---|"]
        for k in sorted(envs):
            vals = envs[k]
            txt = next(iter(vals)) if len(vals) == 1 else "; ".join(f"{v} ({n} runs)" for v, n in sorted(vals.items()))
            out.append(f"| {k} | {txt.replace('|', '/')} |")
    else:
        out.append("No environment recorded.")
    return out + [""]


def _clear(report_dir: Path) -> None:
    """Remove files from a previous report so a vanished table does not linger."""
    for p in report_dir.iterdir():
        if p.is_file() and (p.name == "report.md" or p.name.startswith(("table_", "fig_"))):
            p.unlink()


def write_report(study_dir: Path) -> Path:
    """Write study_dir/report/ (report.md, tables as .csv/.tex, figures as .png); returns report.md."""
    study_dir = Path(study_dir)
    db = study_dir / "study.db"
    if not db.exists():
        raise SftdpoError(f"no study database at {db}; run the study first")
    with Store(db) as store:
        return _write(study_dir, Study(store))


def _write(study_dir: Path, study: Study) -> Path:
    out_dir = study_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)

    md = [f"# Study report: {study_dir.name}", "",
          f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from `study.db`: "
          f"{len(study.done)} finished runs in {len(study.conditions)} conditions (a condition = all config "
          "fields except the seed). Cells: mean ± std [95% percentile-bootstrap CI of the mean over seeds] (n seeds); "
          "a single seed shows its value with n=1. Accuracy/F1 in percent, chrF 0–100.", ""]
    md += _runs_section(study) + _setup_section(study)

    def emit(heading: str, table: Table | None, missing: str) -> None:
        md.extend([f"## {heading}", ""])
        if table is None:
            md.extend([missing, ""])
            return
        table.write_csv(out_dir / f"{table.slug}.csv")
        table.write_tex(out_dir / f"{table.slug}.tex")
        md.extend([table.markdown(), ""])

    def figure(name: str, fn, task: str, caption: str) -> None:
        path = out_dir / f"{name}_{task}.png"
        if fn(study, task, path):
            md.extend([f"![{caption}]({path.name})", ""])
        else:
            md.extend([f"_No {task} figure: {caption.lower()} needs epoch curves of the conditions compared._", ""])

    emit("Table A: paraphrase", table_a(study), "No finished paraphrase runs; Table A omitted.")
    b_tables = table_b(study)
    emit("Table B: sonnets", b_tables[0] if b_tables else None, "No finished sonnet runs; Table B omitted.")
    for t in b_tables[1:]:
        emit("Table B2: sonnets by decoding temperature", t, "")

    emit("SFT→DPO hand-off", table_handoff(study), "No finished runs; hand-off table omitted.")
    for task in ("paraphrase", "sonnet"):
        if study.main_conditions(task):
            figure("fig_handoff", figure_handoff, task, f"{task}: dev metric vs epoch per regime")

    md += ["## FFT vs LoRA at matched depth", ""]
    for task in ("paraphrase", "sonnet"):
        if study.main_conditions(task):
            figure("fig_fft_vs_lora", figure_fft_vs_lora, task, f"{task}: FFT vs LoRA")
    if not study.conditions:
        md += ["No finished runs; figures omitted.", ""]

    emit("Cost", table_cost(study), "No finished runs; cost table omitted.")
    emit("Data scale", table_data_scale(study),
         "No condition was run at several data fractions; data-scale table omitted.")
    comp, skipped = table_comparisons(study)
    emit("Key comparisons (paired bootstrap)", comp,
         "No pair of conditions with matching seeds and dev outputs; key comparisons omitted. "
         "(The paper reports no significance tests.)")
    if skipped:
        md += ["Comparisons not tested:", ""] + [f"- {s}" for s in skipped] + [""]

    report = out_dir / "report.md"
    report.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return report
