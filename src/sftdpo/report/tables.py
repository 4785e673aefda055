"""The report's tables: A (paraphrase), B (sonnets), hand-off, cost, data scale, key comparisons."""

from __future__ import annotations

import math
from collections import defaultdict

from ..config import SftdpoError
from ..stats import holm, paired_bootstrap
from .paper import _paper_cells
from .results import (SHOWN, TASK_METRICS, Condition, StudyResults, _cond_key, _fmt_value, _settings, _sort_key,
                      metric_columns, param_label, regime_label, test_metrics)
from .table import INTERVAL_NAME, MIN_SEEDS_FOR_INTERVAL, Cell, Table, _stat

CELLS = (f"Cells over seeds: one or two seeds show each seed's value (n=1, n=2); from {MIN_SEEDS_FOR_INTERVAL} seeds, "
         f"mean ± std [{INTERVAL_NAME}] (n seeds). Bold: the best mean of a column.")

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


def table_a(study: StudyResults) -> Table | None:
    conds = study.main_conditions("paraphrase")
    if not conds:
        return None
    keys = TASK_METRICS["paraphrase"]
    sett = _settings(conds, SHOWN)
    rows = [r + ["", ""] for r in untrained_rows(conds, keys, 2)]
    frac = conds[0].cfg.get("data_fraction", 1.0)
    n_ref = len(rows)
    for c in conds:
        paper, delta = _paper_cells("paraphrase", c, keys)
        rows.append([c.cfg.get("model"), regime_label(c.cfg), param_label(c.cfg), sett[id(c)],
                     *(c.stat(k, s) for k, _, s in keys), paper, delta])
    return Table("table_a_paraphrase", "Table A: paraphrase detection (QQP dev) by regime × parameterization",
                 ["Model", "Regime", "Param", "Setting", *(t for _, t, _ in keys), "Paper acc / F1", "Δ acc / F1 (ours − paper)"],
                 rows, [f"Final-epoch dev metrics, data fraction {frac:g}. {CELLS}",
                        "Paper numbers (GPT-2) shown only for the gpt2 backbone; Δ uses our seed mean."],
                 best=tuple(t for _, t, _ in keys), reference_rows=n_ref).drop_empty("Setting")


def _sonnet_rows(study: StudyResults, conds: list[Condition], with_temp: bool) -> tuple[list[list[Cell]], list[str]]:
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


def table_b(study: StudyResults) -> list[Table]:
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
             "Δ vs a range is the distance to its nearest end (0 inside).", CELLS]
    n_ref = sum(1 for r in rows if r[1] == "untrained (epoch 0)")
    out = [Table("table_b_sonnet", "Table B: sonnet continuation chrF by regime × pair construction",
                 ["Model", "Regime", "Pairs", "Param", "Setting", *titles, "Paper chrF", "Δ chrF (ours − paper)"],
                 rows, notes, best=tuple(titles), reference_rows=n_ref).drop_empty("Setting")]
    if len(temps) > 1:
        top = max(c.cfg.get("data_fraction", 1.0) for c in study.task_conditions("sonnet"))
        allc = [c for c in study.task_conditions("sonnet") if c.cfg.get("data_fraction", 1.0) == top]
        allc.sort(key=lambda c: (_sort_key({**c.cfg, "temperature": 0}), c.cfg.get("temperature")))
        rows2, titles2 = _sonnet_rows(study, allc, with_temp=True)
        out.append(Table("table_b2_sonnet_temperature", "Table B2: sonnet chrF by decoding temperature",
                         ["Model", "Regime", "Pairs", "Param", "Setting", "Temperature", *titles2], rows2,
                         ["Same runs' settings as Table B, one row per decoding temperature.", CELLS],
                         best=tuple(titles2)).drop_empty("Setting"))
    return out


def table_custom(study: StudyResults, task: str) -> Table | None:
    """A custom task's table (`--task classify|generate`): its dev metrics by regime x parameterization."""
    conds = study.main_conditions(task)
    if not conds:
        return None
    keys = metric_columns(conds[0].cfg)
    sett = _settings(conds, SHOWN)
    rows = untrained_rows(conds, keys, 2)
    n_ref = len(rows)
    rows += [[c.cfg.get("model"), regime_label(c.cfg), param_label(c.cfg), sett[id(c)], *(c.stat(k, s) for k, _, s in keys)]
             for c in conds]
    kind = conds[0].cfg.get("task")
    return Table(f"table_{_slug(task)}", f"Task {task} ({kind}): dev metrics by regime × parameterization",
                 ["Model", "Regime", "Param", "Setting", *(t for _, t, _ in keys)], rows,
                 [f"Final-epoch dev metrics; data: {conds[0].runs[0]['summary'].get('data_source', 'not recorded')}.", CELLS],
                 best=tuple(t for _, t, _ in keys), reference_rows=n_ref).drop_empty("Setting")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_") or "task"


def table_handoff(study: StudyResults) -> Table | None:
    rows: list[list[Cell]] = []
    for task in study.tasks():
        conds = study.main_conditions(task)
        key, label, scale = study.primary(task)
        sett = _settings(conds, SHOWN)
        for c in conds:
            bests = [study.best(r, key, scale) for r in c.runs]
            finals = c.values(key, scale)
            gaps = [None if f is None or b[0] is None else f - b[0] for f, b in zip(finals, bests)]
            rows.append([task, c.cfg.get("model"), param_label(c.cfg), regime_label(c.cfg), sett[id(c)], label,
                         _stat([b[0] for b in bests]), _stat([b[1] for b in bests], 0), _stat(finals), _stat(gaps)])
    if not rows:
        return None
    return Table("table_handoff", "Hand-off: best and final dev metric per regime",
                 ["Task", "Model", "Param", "Regime", "Setting", "Metric", "Best", "Best epoch", "Final", "Final − best"],
                 rows, ["Best: best dev value over epochs (per seed, then pooled); epochs count across the whole run, "
                        "so SFT@k→DPO switches to DPO after epoch k.", CELLS]).drop_empty("Setting")


def table_cost(study: StudyResults) -> Table | None:
    rows: list[list[Cell]] = []
    for task in study.tasks():
        conds = study.main_conditions(task)
        sett = _settings(conds, SHOWN)
        for c in conds:
            s0 = c.runs[0]["summary"]
            tp, tot = s0.get("trainable_params"), s0.get("total_params")
            params = "—" if tp is None else f"{tp:,}" + (f" ({_percent(100 * tp / tot)})" if tot else "")
            rows.append([task, c.cfg.get("model"), regime_label(c.cfg), param_label(c.cfg), sett[id(c)],
                         c.stat("wall_clock_per_epoch_s", 1, 1), c.stat("train_tokens_per_s", 1, 0),
                         c.stat("peak_memory_mb", 1, 0), params, c.stat("adapter_mb", 1, 2)])
    if not rows:
        return None
    devices = sorted({str((r["env"] or {}).get("device")) for r in study.done if (r["env"] or {}).get("device")})
    return Table("table_cost", "Cost per regime × parameterization",
                 ["Task", "Model", "Regime", "Param", "Setting", "Wall-clock / epoch (s)", "Train tokens/s",
                  "Peak memory (MB)", "Trainable params (% of total)", "Trained weights on disk (MB)"], rows,
                 ["Wall-clock per epoch: mean over trained epochs (training only). Trained weights on disk: the "
                  "checkpoint's weights file (the adapter; the whole model for FFT, BitFit and LN, whose trained "
                  "weights are the model's own). Device(s): " + (", ".join(devices) or "not recorded") + "."]
                 ).drop_empty("Setting", "Trained weights on disk (MB)")


def _percent(x: float) -> str:
    """A share in %: two decimals, or two significant digits below 0.01% (VeRA, IA3: a few thousandths)."""
    return f"{x:.2f}%" if x >= 0.01 or x == 0 else f"{x:.2g}%"


def table_data_scale(study: StudyResults) -> Table | None:
    rows: list[list[Cell]] = []
    budgets = []
    for task in study.tasks():
        key, label, scale = study.primary(task)
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


def _comparison_pairs(study: StudyResults) -> list[tuple[str, Condition, Condition]]:
    """(label, A, B) pairs for the three headline questions; A − B is tested."""
    conds = [c for t in study.tasks() for c in study.main_conditions(t)]
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


def _pooled_outputs(study: StudyResults, cond: Condition, seeds: list) -> list[tuple[str, str, str]]:
    by_seed = {r["config"].get("seed"): r for r in cond.runs}
    return [(f"s{s}:{i}", p, ref) for s in seeds for i, p, ref in study.outputs(by_seed[s]["run_hash"])]


def table_comparisons(study: StudyResults) -> tuple[Table | None, list[str]]:
    rows: list[list[Cell]] = []
    p_values: list[float] = []
    skipped: list[str] = []
    sett = {k: v for t in study.tasks() for k, v in _settings(study.main_conditions(t), SHOWN).items()}
    for label, a, b in _comparison_pairs(study):
        setting = "" if not (sett[id(a)] or sett[id(b)]) else f"A: {sett[id(a)] or '—'}; B: {sett[id(b)] or '—'}"
        seeds_a = {r["config"].get("seed") for r in a.runs if study.outputs(r["run_hash"])}
        seeds_b = {r["config"].get("seed") for r in b.runs if study.outputs(r["run_hash"])}
        seeds = sorted(seeds_a & seeds_b, key=str)
        if not seeds:
            skipped.append(f"{a.task}: {label}: no seed with dev outputs in both")
            continue
        oa, ob = _pooled_outputs(study, a, seeds), _pooled_outputs(study, b, seeds)
        for metric, mlabel, scale in test_metrics(a.cfg):
            try:
                res = paired_bootstrap(oa, ob, metric, n_boot=N_BOOT, seed=0)
            except SftdpoError as e:
                skipped.append(f"{a.task}: {label}: {e}")
                break
            p_values.append(res["p_value"])
            rows.append([a.task, a.cfg.get("model"), label, setting, mlabel, f"{res['delta'] * scale:+.2f}",
                         f"[{res['ci_lo'] * scale:+.2f}, {res['ci_hi'] * scale:+.2f}]", METHOD, str(res["n"]),
                         f"{res['p_value']:.4f}", "", _seeds(seeds)])
    if not rows:
        return None, skipped
    for row, p_holm in zip(rows, holm(p_values)):
        row[10] = f"{p_holm:.4f}"
    m = len(rows)
    notes = ["The paper reports no significance tests; these are ours. Runs of A and B with the same seed are paired "
             f"and their dev examples pooled (ids prefixed by seed); {N_BOOT} resamples of examples; two-sided "
             f"p = 2·min(P(Δ* ≤ 0), P(Δ* ≥ 0)), floored at 1/{N_BOOT + 1}."]
    if m > 1:
        notes.append(f"{m} tests are shown: read p_Holm (Holm's adjustment over all {m}), which keeps the chance of "
                     "any false positive among them at the level read; the raw p holds for one test alone.")
    return Table("table_comparisons", "Key comparisons: paired bootstrap over dev examples (A − B)",
                 ["Task", "Model", "Comparison (A vs B)", "Setting", "Metric", "Δ (A − B)", "95% CI", "Method",
                  "n examples", "p", "p_Holm", "Seeds"], rows, notes).drop_empty("Setting"), skipped


N_BOOT = 1000
METHOD = "paired bootstrap"


def _seeds(seeds: list) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)
