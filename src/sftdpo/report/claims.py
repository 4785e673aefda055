"""The paper's claims as pre-registered comparisons, tested on a study: the report's Claims section
and the detectable effects `study run --dry-run` prints before anything is trained.

A spec declares `claims:` (a shipped claims file by name, e.g. `claims: paper`, or a mapping with
`from`, `where`, `skip`, `assume`, `define`; docs/claims.md). Each claim names two sets of
conditions by config fields (`a`, `b`), the fields in which paired runs may differ besides those
(`vary`; `more`: A has the larger value of that field), the metric, the kind (stats.KINDS) and the
paper's numbers (report/paper.py). Runs pair when every other field that can change a result is
equal, the seed included; conditions compared that way form one comparison (or, with `pool`, every
such pair of runs on one device). Tests: stats.seeds_bootstrap over dev examples and Student's t over
the pairs, both required (stats.claim_test); one p-value per claim over its comparisons (stats.claim_p)
and Holm's adjustment across the claims.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import logging

import numpy as np
import yaml

from ..config import FIELD_TYPES, TASK_KIND, RunConfig, SftdpoError, coerce_field
from ..stats import (ALPHA, KINDS, METRICS, MIN_PAIRS, POWER, claim_p, claim_test, holm, mde_normal, mde_t, reading,
                     seeds_bootstrap, t_interval)
from .paper import PAPER, _paper_entry
from .results import NON_CONDITION, Condition, StudyResults, _cond_key, _fmt_value, param_label, regime_label
from .table import Table, _stat

if TYPE_CHECKING:
    from . import Doc

SHIPPED_CLAIMS = ("paper",)
# summary values a claim can compare without per-example outputs (t over pairs only)
SUMMARY_METRICS = ("wall_clock_per_epoch_s", "wall_clock_s", "train_tokens_per_s", "peak_memory_mb")
EFFECTS = ("difference", "ratio")
N_BOOT = 2000
# --dry-run's assumptions before any run (a spec's `claims: {assume: ...}` sets them), each justified in
# docs/claims.md: the share of dev pairs on which two fine-tuned classifiers disagree (the
# per-example variance of an accuracy difference); the per-example variance of a chrF difference
# (chrF points squared per dev sonnet); the sd of a wall-clock log-ratio between paired runs; and the
# sd of an effect between training seeds beyond dev-set noise (unknown before running: 0, so the
# printed effect is a lower bound)
ASSUME = {"discordance": 0.2, "chrf_variance": 3.0, "log_ratio_sd": 0.05, "seed_sd": 0.0}
VERDICTS = {"supported": "supported", "contradicted": "contradicted", "undecided": "undecided at this size"}

_CLAIM_KEYS = ("number", "says", "a", "b", "where", "vary", "more", "metric", "kind", "margin", "effect", "pool", "paper")
_SPEC_KEYS = ("from", "where", "skip", "assume", "define")
_NUMERIC = ("int", "float", "int | None", "float | None")

log = logging.getLogger("sftdpo")


# -- definitions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """One pre-registered comparison (see the module docstring); selectors map a config field to
    ("in" | "not", values)."""

    name: str
    number: str
    says: str
    a: dict[str, tuple[str, tuple]]
    b: dict[str, tuple[str, tuple]]
    where: dict[str, tuple[str, tuple]]
    vary: tuple[str, ...]
    more: str | None
    metric: dict[str, str]  # task name, task or kind ("*": any) -> metric
    kind: str
    margin: float
    effect: str
    pool: tuple[str, ...]
    paper: tuple[dict, ...]

    @property
    def compared(self) -> set[str]:
        """Fields in which A and B may differ: those the selectors set differently, `vary`, `more`."""
        sel = {f for f in set(self.a) | set(self.b) if self.a.get(f) != self.b.get(f)}
        return sel | set(self.vary) | ({self.more} if self.more else set())

    def metric_for(self, cfg: dict) -> str | None:
        task = cfg.get("task", "")
        for key in (cfg.get("task_name"), task, TASK_KIND.get(task), "*"):
            if key in self.metric:
                return self.metric[key]
        return None

    @property
    def ratio(self) -> bool:
        return self.effect == "ratio"


@dataclass
class ClaimSet:
    source: str  # what the spec declared, for the report
    claims: list[Claim]
    assume: dict[str, float]


def _bad(where: str, msg: str) -> SftdpoError:
    return SftdpoError(f"{where}: {msg}")


def _selector(d: Any, where: str, key: str, extra: tuple[str, ...] = ()) -> dict[str, tuple[str, tuple]]:
    """{field: value | [values] | {not: value | [values]}} with every field a config field and every
    value of its field's type."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise _bad(where, f"`{key}` must be a mapping of config fields to values, e.g. {{param: lora}}")
    out = {}
    for f, v in d.items():
        if f not in FIELD_TYPES and f not in extra:
            raise _bad(where, f"`{key}` names {f}, which is not a config field")
        how = "in"
        if isinstance(v, dict):
            if set(v) != {"not"}:
                raise _bad(where, f"`{key}.{f}`: a mapping means {{not: VALUE}} (any value but VALUE)")
            how, v = "not", v["not"]
        vals = v if isinstance(v, list) else [v]
        try:
            out[f] = (how, tuple(_coerce(f, x) for x in vals))
        except SftdpoError as e:
            raise _bad(where, f"`{key}.{f}`: {e}") from None
    return out


def _coerce(f: str, v: Any) -> Any:
    if f not in FIELD_TYPES:
        return v
    if v is None and "None" not in FIELD_TYPES[f]:
        return None  # `{not: null}` on a field that is never null is harmless
    return coerce_field(f, v)


def _fields(v: Any, where: str, key: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    vals = [] if v is None else v if isinstance(v, list) else [v]
    for f in vals:
        if f not in FIELD_TYPES and f not in extra:
            raise _bad(where, f"`{key}` names {f}, which is not a config field")
    return tuple(vals)


def parse_claim(name: str, d: Any, where: str) -> Claim:
    """One claim's definition, checked: one line naming the claim and the field for what is wrong."""
    where = f"{where}: claim {name}"
    if not isinstance(d, dict):
        raise _bad(where, "a claim is a mapping (says, a, b, metric, kind, ...)")
    unknown = sorted(set(map(str, d)) - set(_CLAIM_KEYS))
    if unknown:
        raise _bad(where, f"unknown key(s) {', '.join(unknown)}; a claim has {', '.join(_CLAIM_KEYS)}")
    says = d.get("says")
    if not isinstance(says, str) or not says.strip():
        raise _bad(where, "`says` must state the claim in words")
    if "a" not in d or "b" not in d:
        raise _bad(where, "needs `a` and `b`: the conditions compared, by config fields (e.g. a: {param: fft})")
    a, b = _selector(d["a"], where, "a"), _selector(d["b"], where, "b")
    more = d.get("more")
    if more is not None and (more not in FIELD_TYPES or FIELD_TYPES[more] not in _NUMERIC):
        raise _bad(where, f"`more` must name a numeric config field (e.g. data_fraction), got {more!r}")
    metric = d.get("metric")
    if isinstance(metric, str):
        metric = {"*": metric}
    if not isinstance(metric, dict) or not metric:
        raise _bad(where, "`metric` must be a metric name or a mapping of task to metric (e.g. {paraphrase: accuracy})")
    effect = d.get("effect", "difference")
    if effect not in EFFECTS:
        raise _bad(where, f"`effect` must be {' or '.join(EFFECTS)}, got {effect!r}")
    for task, m in metric.items():
        if m not in METRICS and m not in SUMMARY_METRICS:
            raise _bad(where, f"`metric` {m!r} (for {task}) is not one of {', '.join([*METRICS, *SUMMARY_METRICS])}")
        if effect == "ratio" and m in METRICS:
            raise _bad(where, f"`effect: ratio` is for positive summary values ({', '.join(SUMMARY_METRICS)}), not {m}")
    kind = d.get("kind")
    if kind not in KINDS:
        raise _bad(where, f"`kind` must be one of {', '.join(KINDS)}, got {kind!r}")
    margin = d.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        raise _bad(where, f"`margin` must be a number >= 0 (metric units; a ratio's relative, 0.1 = 10%), got {margin!r}")
    if kind == "equivalent" and margin <= 0:
        raise _bad(where, "`kind: equivalent` needs a `margin` > 0 (e.g. margin: 1.5 accuracy points)")
    if effect == "ratio" and kind == "no-less-than" and margin >= 1:
        raise _bad(where, f"`margin` of a ratio no less than 1 - margin must be below 1, got {margin}")
    claim = Claim(name=str(name), number=str(d.get("number", name)), says=says.strip(), a=a, b=b,
                  where=_selector(d.get("where"), where, "where"), vary=_fields(d.get("vary"), where, "vary"),
                  more=more, metric=metric, kind=kind, margin=float(margin), effect=effect,
                  pool=_fields(d.get("pool"), where, "pool", ("device",)), paper=_paper_refs(d.get("paper"), where))
    if not claim.compared:
        raise _bad(where, "`a` and `b` select the same conditions: they must differ in a field, or name one in `more`")
    return claim


def _paper_refs(refs: Any, where: str) -> tuple[dict, ...]:
    """`paper:` references, each {task, a, b} resolved to report/paper.py's numbers (which hold them once)."""
    if refs is None:
        return ()
    if not isinstance(refs, list):
        raise _bad(where, "`paper` must be a list of {task, a, b} references to report/paper.py's numbers")
    out = []
    for i, r in enumerate(refs):
        if not isinstance(r, dict) or set(r) != {"task", "a", "b"} or r["task"] not in PAPER:
            raise _bad(where, f"paper[{i}] must be {{task: paraphrase|sonnet, a: {{...}}, b: {{...}}}}")
        for side in ("a", "b"):
            if not isinstance(r[side], dict) or _paper_entry(r["task"], r[side]) is None:
                raise _bad(where, f"paper[{i}].{side} {r[side]} matches no number of report/paper.py")
        out.append(r)
    return tuple(out)


def _load_file(ref: str, where: str) -> tuple[dict, str]:
    if ref in SHIPPED_CLAIMS:
        res = importlib.resources.files("sftdpo").joinpath("specs").joinpath("claims").joinpath(f"{ref}.yaml")
        text, label = res.read_text(encoding="utf-8"), ref
    else:
        p = Path(ref)
        if not p.is_file():
            raise _bad(where, f"claims {ref!r} not found: give a YAML file or one of {', '.join(SHIPPED_CLAIMS)}")
        text, label = p.read_text(encoding="utf-8"), str(p)
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _bad(where, f"claims file {label} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict) or not isinstance(d.get("claims"), dict) or set(d) - {"description", "assume", "claims"}:
        raise _bad(where, f"claims file {label} must be a mapping with `claims:` (name -> claim) and optional `assume:`")
    return d, label


def parse_claims(value: Any, where: str) -> ClaimSet | None:
    """A spec's `claims:` value: a claims file (shipped name or path), or {from, where, skip, assume,
    define}. `where` narrows every claim on the fields it does not compare; `define` adds claims or
    changes keys of inherited ones; `skip` drops claims by name. None when the spec declares none."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"from": value}
    if not isinstance(value, dict):
        raise _bad(where, "`claims` must be a claims file (e.g. `claims: paper`) or a mapping with from/where/skip/define")
    unknown = sorted(set(map(str, value)) - set(_SPEC_KEYS))
    if unknown:
        raise _bad(where, f"`claims` has unknown key(s) {', '.join(unknown)}; known: {', '.join(_SPEC_KEYS)}")
    defs: dict[str, Any] = {}
    assume = dict(ASSUME)
    source = "this spec"
    if value.get("from") is not None:
        base, source = _load_file(str(value["from"]), where)
        defs = dict(base["claims"])
        assume.update(_assume(base.get("assume"), f"{where}: claims file {source}"))
    assume.update(_assume(value.get("assume"), where))
    define = value.get("define") or {}
    if not isinstance(define, dict):
        raise _bad(where, "`claims.define` must map claim names to (partial) claims")
    for name, d in define.items():
        if name in defs and isinstance(d, dict) and isinstance(defs[name], dict):
            defs[name] = {**defs[name], **d}
        else:
            defs[name] = d
    skip = value.get("skip") or []
    skip = skip if isinstance(skip, list) else [skip]
    for name in skip:
        if name not in defs:
            raise _bad(where, f"`claims.skip` names {name}, which is not a claim ({', '.join(map(str, defs)) or 'none'})")
    defs = {k: v for k, v in defs.items() if k not in skip}
    glob = _selector(value.get("where"), where, "claims.where")
    claims = []
    for name, d in defs.items():
        c = parse_claim(name, d, where)
        narrowed = {f: v for f, v in glob.items() if f not in c.compared}
        claims.append(Claim(**{**c.__dict__, "where": {**narrowed, **c.where}}))
    return ClaimSet(source, claims, assume)


def _assume(d: Any, where: str) -> dict[str, float]:
    if d is None:
        return {}
    if not isinstance(d, dict) or set(d) - set(ASSUME):
        raise _bad(where, f"`assume` sets some of {', '.join(ASSUME)}")
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "discordance" and v > 1):
            raise _bad(where, f"`assume.{k}` must be a number >= 0{' and <= 1' if k == 'discordance' else ''}, got {v!r}")
    return {k: float(v) for k, v in d.items()}


# -- matching ------------------------------------------------------------------------------------

def _selects(cfg: dict, sel: dict[str, tuple[str, tuple]]) -> bool:
    for f, (how, vals) in sel.items():
        have = {_coerce(f, cfg.get(f))} | ({cfg["task_name"]} if f == "task" and cfg.get("task_name") else set())
        if (how == "in") != bool(have & set(vals)):
            return False
    return True


def _match_key(cfg: dict, drop: set[str]) -> str:
    """The fields that must be equal between paired conditions: every field that can change a result
    (RunConfig.identity: normalised, so LoRA options of an FFT run do not count) but the compared ones."""
    rc = RunConfig.from_dict({k: v for k, v in cfg.items() if k in FIELD_TYPES})
    return _cond_key(rc.identity(tuple(drop)))


@dataclass
class Comparison:
    """One tested comparison of a claim: pairs of runs (a, b), A's and B's conditions, a label."""

    claim: Claim
    task: str
    metric: str
    label: str
    pairs: list[tuple[dict, dict]]
    device: str | None = None


def _device(run: dict) -> str | None:
    return (run.get("summary") or {}).get("device") or (run.get("env") or {}).get("device")


def comparisons(claim: Claim, conditions: list[Condition]) -> list[Comparison]:
    """The claim's comparisons among `conditions`: A's and B's conditions paired when they agree on
    every field not compared, their runs paired by seed; with `pool`, the pairs of runs grouped by
    task, the pool fields and (for `device`) the device each pair ran on."""
    drop = claim.compared | {"seed"}
    side_a = [c for c in conditions if _selects(c.cfg, claim.a) and _selects(c.cfg, claim.where)]
    side_b = [c for c in conditions if _selects(c.cfg, claim.b) and _selects(c.cfg, claim.where)]
    keys = {id(c): _match_key(c.cfg, drop) for c in side_a + side_b}
    out: list[Comparison] = []
    pooled: dict[tuple, Comparison] = {}
    for ca in side_a:
        for cb in side_b:
            if ca is cb or keys[id(ca)] != keys[id(cb)]:
                continue
            if claim.more and not (ca.cfg.get(claim.more) or 0) > (cb.cfg.get(claim.more) or 0):
                continue
            metric = claim.metric_for(ca.cfg)
            if metric is None:
                continue
            b_by_seed = {r["config"].get("seed"): r for r in cb.runs}
            pairs = [(r, b_by_seed[r["config"].get("seed")]) for r in ca.runs if r["config"].get("seed") in b_by_seed]
            if not claim.pool:
                out.append(Comparison(claim, ca.task, metric, _label(claim, ca.cfg, cb.cfg), pairs))
                continue
            for ra, rb in pairs:
                dev = _device(ra)
                if "device" in claim.pool and dev != _device(rb):
                    continue  # not a pair: run on different machines
                # a summary value (wall-clock) pools every task; a dev metric is the task's own
                task = ca.task if metric in METRICS else "all tasks"
                key = (task, metric, *(dev if f == "device" else _fmt_value(ca.cfg.get(f)) for f in claim.pool))
                if key not in pooled:
                    where = ", ".join(f"{f}={v}" for f, v in zip(claim.pool, key[2:]) if f != "device")
                    label = f"{_side(claim, ca.cfg, cb.cfg)} vs {_side(claim, cb.cfg, ca.cfg)}, all paired runs" + (
                        f" ({where})" if where else "")
                    pooled[key] = Comparison(claim, task, metric, label, [], dev if "device" in claim.pool else None)
                pooled[key].pairs.append((ra, rb))
    return out + list(pooled.values())


def _side(claim: Claim, cfg: dict, other: dict) -> str:
    """One side's name: its values of the compared fields that differ from the other side's."""
    parts = []
    differ = [f for f in sorted(claim.compared) if _fmt_value(cfg.get(f)) != _fmt_value(other.get(f))]
    if {"regime", "handoff_epoch"} & set(differ):
        parts.append(regime_label(cfg))
    if {"param", "lora_rank"} & set(differ):
        parts.append(param_label(cfg))
    if "pairs" in differ and cfg.get("regime") != "sft":
        parts.append(f"pairs {cfg.get('pairs')}")
    shown = {"regime", "handoff_epoch", "param", "lora_rank", "pairs"}
    parts += [f"{f}={_fmt_value(cfg.get(f))}" for f in differ if f not in shown and f not in _QUIET]
    return " ".join(parts) or "—"


# fields that differ between paired runs as a matter of course (learning rates per param, DPO settings
# that an SFT-only run does not read): not part of a side's name
_QUIET = {"lr", "dpo_lr", "lora_alpha", "lora_dropout", "lora_targets", "use_rslora", "use_dora", "beta", "loss_type",
          "label_smoothing", "logp_reduction", "pairs_n", "pairs_top_k", "pairs_temperatures"}


def _label(claim: Claim, a: dict, b: dict) -> str:
    context = []
    if not {"regime", "handoff_epoch"} & claim.compared:
        context.append(regime_label(a))
    if not {"param", "lora_rank"} & claim.compared:
        context.append(param_label(a))
    if a.get("regime") != "sft" and a.get("task") == "sonnet" and "pairs" not in claim.compared:
        context.append(f"pairs {a.get('pairs')}")
    for f, name in (("data_fraction", "data"), ("temperature", "T"), ("budget_steps", "budget")):
        if f in claim.compared or a.get(f) in (None, 1.0) or (f == "temperature" and a.get("task") != "sonnet"):
            continue
        context.append(f"{name} {_fmt_value(a.get(f))}")
    return f"{_side(claim, a, b)} vs {_side(claim, b, a)}" + (f" ({', '.join(context)})" if context else "")


# -- evaluation ----------------------------------------------------------------------------------

_SCALE = {"accuracy": 100.0, "macro_f1": 100.0, "f1_positive": 100.0, "chrf": 1.0}
_UNITS = {"accuracy": "points", "macro_f1": "points", "f1_positive": "points", "chrf": "chrF"}
_TITLES = {"accuracy": "accuracy (%)", "macro_f1": "macro-F1 (%)", "f1_positive": "F1 yes (%)", "chrf": "chrF",
           "wall_clock_per_epoch_s": "wall-clock / epoch (s)", "wall_clock_s": "wall-clock (s)",
           "train_tokens_per_s": "train tokens/s", "peak_memory_mb": "peak memory (MB)"}


@dataclass
class Result:
    """A comparison's numbers in display units (ratios as logs until shown)."""

    comparison: Comparison
    a: list[float]
    b: list[float]
    test: dict | None
    ci_examples: tuple[float, float] | None = None
    ci_seeds: tuple[float, float] | None = None
    reason: str = ""  # why it cannot decide
    note: str = ""  # what was left out


@dataclass
class Outcome:
    """A claim's comparisons and its verdict: p over the comparisons (stats.claim_p), Holm-adjusted
    across the claims of the report."""

    claim: Claim
    results: list[Result]
    p: float | None = None
    direction: str | None = None
    p_holm: float | None = None
    verdict: str = "undecided"

    @property
    def tested(self) -> list[Result]:
        return [r for r in self.results if r.test is not None]


def _margin(claim: Claim) -> float:
    """The claim's margin on the scale the test works on (a ratio's on the log scale)."""
    if not claim.ratio:
        return claim.margin
    return -math.log(1 - claim.margin) if claim.kind == "no-less-than" else math.log(1 + claim.margin)


def evaluate(comp: Comparison, study: StudyResults) -> Result:
    """The comparison's effect and tests (stats.claim_test) from its pairs' dev outputs or summaries."""
    claim, metric = comp.claim, comp.metric
    if metric in METRICS:
        pairs = [(ra, rb) for ra, rb in comp.pairs if study.outputs(ra["run_hash"]) and study.outputs(rb["run_hash"])]
        note = f"{len(comp.pairs) - len(pairs)} pair(s) without dev outputs left out" if len(pairs) < len(comp.pairs) else ""
        if not pairs:
            return Result(comp, [], [], None, reason="no paired runs with dev outputs")
        try:
            boot = seeds_bootstrap([(study.outputs(ra["run_hash"]), study.outputs(rb["run_hash"])) for ra, rb in pairs],
                                   metric, N_BOOT, seed=0)
        except SftdpoError as e:
            return Result(comp, [], [], None, reason=str(e))
        comp.pairs = pairs
        s = _SCALE[metric]
        per_pair = [v * s for v in boot["per_pair"]]
        test = claim_test(claim.kind, _margin(claim), boot["effect"] * s, per_pair, boot["se"] * s)
        test["n_examples"], test["groups"] = boot["n"], boot["groups"]
        res = Result(comp, [v * s for v in boot["a"]], [v * s for v in boot["b"]], test, note=note)
        half = 1.959963984540054 * boot["se"] * s
        res.ci_examples = (test["effect"] - half, test["effect"] + half)
    else:
        vals = [((ra["summary"] or {}).get(metric), (rb["summary"] or {}).get(metric)) for ra, rb in comp.pairs]
        ok = [(a, b) for a, b in vals if a is not None and b is not None and (not claim.ratio or (a > 0 and b > 0))]
        if not ok:
            return Result(comp, [], [], None, reason=f"no paired runs with {metric} recorded")
        per_pair = [math.log(a / b) if claim.ratio else a - b for a, b in ok]
        test = claim_test(claim.kind, _margin(claim), float(np.mean(per_pair)), per_pair, None)
        res = Result(comp, [a for a, _ in ok], [b for _, b in ok], test)
    if len(per_pair) >= 2:
        _, _, lo, hi = t_interval(per_pair)
        res.ci_seeds = (lo, hi)
    if not test["decides"]:
        res.reason = f"n={len(per_pair)} {'pair' if comp.device else 'seed'}{'s' if len(per_pair) != 1 else ''}: " \
                     f"a verdict needs >= {MIN_PAIRS}"
    return res


def evaluate_study(claims: ClaimSet, study: StudyResults) -> list[Outcome]:
    """Every claim's comparisons tested, one p per claim, Holm's adjustment across the claims, verdicts."""
    out = [Outcome(c, [evaluate(comp, study) for comp in comparisons(c, study.conditions)]) for c in claims.claims]
    for o in out:
        cp = claim_p([r.test for r in o.tested]) if o.tested else None
        if cp is not None:
            o.p, o.direction = cp
    decided = [o for o in out if o.p is not None]
    for o, p in zip(decided, holm([o.p for o in decided])):
        o.p_holm = p
        o.verdict = o.direction if p < ALPHA else "undecided"
    return out


# -- display -------------------------------------------------------------------------------------

def _fmt_effect(claim: Claim, metric: str, v: float) -> str:
    if claim.ratio:
        return f"×{math.exp(v):.3f}"
    return f"{v:+.2f}"


def _fmt_mde(claim: Claim, metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    if claim.ratio:
        return f"{100 * (math.exp(v) - 1):.1f}%"
    return f"{v:.2f} {_UNITS.get(metric, '')}".strip()


def _test_name(claim: Claim, metric: str) -> str:
    m = _fmt_margin(claim, metric)
    return {"greater": "A > B, two-sided at 0", "no-greater-than": f"A ≤ B + {m}, two-sided at +{m}",
            "no-less-than": f"A ≥ B − {m}, two-sided at −{m}", "equivalent": f"TOST ±{m}"}[claim.kind]


def _fmt_margin(claim: Claim, metric: str) -> str:
    if claim.ratio:
        return f"{100 * claim.margin:g}%"
    return f"{claim.margin:g}{'' if metric == 'chrf' else ' pt'}"


def _ours(values: list[float], claim: Claim) -> str:
    st = _stat(values, 3 if claim.ratio else 2)
    return "—" if st is None else str(st)


def _paper_text(claim: Claim) -> str:
    """The paper's numbers for the claim (report/paper.py), or "not reported"."""
    texts = []
    for ref in claim.paper:
        ea, eb = _paper_entry(ref["task"], ref["a"]), _paper_entry(ref["task"], ref["b"])
        metric = claim.metric_for({"task": ref["task"]})
        key = f"dev/{metric}"
        va, vb = ea.get(key), eb.get(key)
        if va is None or vb is None:
            continue
        lo_a, hi_a = va if isinstance(va, tuple) else (va, va)
        lo_b, hi_b = vb if isinstance(vb, tuple) else (vb, vb)
        fa = f"{lo_a:.2f}" if lo_a == hi_a else f"{lo_a:g}–{hi_a:g}"
        fb = f"{lo_b:.2f}" if lo_b == hi_b else f"{lo_b:g}–{hi_b:g}"
        d_lo, d_hi = lo_a - hi_b, hi_a - lo_b
        fd = f"{d_lo:+.2f}" if d_lo == d_hi else f"{d_lo:+.2f} to {d_hi:+.2f}"
        texts.append(f"{ref['task']} {_TITLES.get(metric, metric)}: {_paper_side(ea['match'])} {fa} vs "
                     f"{_paper_side(eb['match'])} {fb} (Δ {fd})")
    return "; ".join(texts) or "not reported"


def _paper_side(match: dict) -> str:
    """A paper entry's condition in words (its `match` in report/paper.py)."""
    regime = match.get("regime")
    r = "DPO" if isinstance(regime, tuple) else regime_label({"regime": regime, "handoff_epoch": match.get("handoff_epoch")})
    p = param_label({"param": match["param"], "lora_rank": match.get("lora_rank")}) if "param" in match else ""
    return f"{p} {r}".strip() + (f" ({match['pairs']} pairs)" if "pairs" in match else "")


def _mde_range(claim: Claim, results: list[Result], metric: str) -> str:
    v = [r.test["mde"] for r in results if r.comparison.metric == metric and r.test["mde"] is not None]
    lo, hi = min(v), max(v)
    span = _fmt_mde(claim, metric, lo) if lo == hi else f"{_fmt_mde(claim, metric, lo)} to {_fmt_mde(claim, metric, hi)}"
    return f"{_TITLES.get(metric, metric)}: {span}"


def claims_tables(outcomes: list[Outcome], source: str) -> tuple[Table, Table | None]:
    """(one row per claim: the paper's numbers, p, p_Holm, verdict, detectable effect; one row per
    comparison: ours, the effect with its intervals, the test, p, detectable effect, its reading)."""
    summary, rows = [], []
    for o in outcomes:
        claim = o.claim
        metrics = dict.fromkeys(r.comparison.metric for r in o.tested if r.test["mde"] is not None)
        detect = "; ".join(_mde_range(claim, o.tested, m) for m in metrics) or "—"
        readings = [reading(r.test) for r in o.tested]
        counts = ", ".join(f"{readings.count(k)} {k}" for k in ("supports", "contradicts", "neither", "no verdict")
                           if readings.count(k))
        tested = f"{len(o.results)}: {counts}" if o.results else "none: no runs of the study match"
        if len(o.tested) < len(o.results):
            tested += f", {len(o.results) - len(o.tested)} not tested"
        if not o.results:
            verdict = "not tested"
        elif o.p is None:
            verdict = VERDICTS["undecided"] + f" (fewer than {MIN_PAIRS} paired seeds)"
        else:
            verdict = VERDICTS[o.verdict]
        summary.append([claim.number, claim.says, _paper_text(claim), tested, "—" if o.p is None else _fmt_p(o.p),
                        "—" if o.p_holm is None else _fmt_p(o.p_holm), verdict, detect])
        for r in o.results:
            comp, t = r.comparison, r.test
            metric = comp.metric
            where = f"{comp.task}" + (f" on {comp.device}" if comp.device else "")
            if t is None:
                rows.append([claim.number, f"{where}: {comp.label}", _TITLES.get(metric, metric), "—", "—", "—",
                             _test_name(claim, metric), "—", "—", f"not tested: {r.reason}"])
                continue
            cis = []
            if r.ci_examples:
                cis.append("[" + ", ".join(_fmt_effect(claim, metric, v) for v in r.ci_examples) + "] examples")
            if r.ci_seeds and t["n_pairs"] >= MIN_PAIRS:
                cis.append("[" + ", ".join(_fmt_effect(claim, metric, v) for v in r.ci_seeds) + "] seeds")
            ps = "; ".join(f"{_fmt_p(p)} {k}" for k, p in t["p_sources"].items()) or "—"
            if t["kind"] == "equivalent" and t["p_contradict"] is not None:
                ps += f" (beyond ±margin: {_fmt_p(t['p_contradict'])})"
            mde = _fmt_mde(claim, metric, t["mde"]) + ("" if t["decides"] else " (examples only)")
            says = reading(t) + "".join(f" ({x})" for x in (r.reason, r.note) if x)
            rows.append([claim.number, f"{where}: {comp.label}", _TITLES.get(metric, metric), _ours(r.a, claim),
                         _ours(r.b, claim), " ".join([_fmt_effect(claim, metric, t["effect"]), *cis]),
                         _test_name(claim, metric), ps, mde, says])
    s_table = Table("table_claims", f"Claims of the paper (arXiv 2603.20100) tested on this study ({source})",
                    ["#", "Claim", "Paper (GPT-2)", "Comparisons", "p", "p_Holm", "Verdict",
                     "Detectable effect (80% power)"], summary, SUMMARY_NOTES)
    if not rows:
        return s_table, None
    t_table = Table("table_claims_tests", "Claims: each comparison's test (A − B)",
                    ["#", "Comparison (A vs B)", "Metric", "A (ours)", "B (ours)", "Δ A − B [95% CI]", "Test",
                     "p", "Detectable (80%)", "On its own"], rows, METHOD_NOTES)
    return s_table, t_table


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


SUMMARY_NOTES = [
    "A claim holds for each comparison it makes (each task, regime, rank, ...): p is the claim's, over its "
    "comparisons (supported only when every one supports: the largest p; contradicted when any one contradicts: "
    "Bonferroni over them; two-sided for directional claims); p_Holm: Holm's step-down adjustment across the "
    f"claims. Verdict at level {ALPHA:g} on p_Holm: supported, contradicted, or undecided at this size.",
    f"Detectable effect: the smallest difference from the claim's point (0, or the margin) each comparison finds "
    f"with {POWER:.0%} power at two-sided level {ALPHA:g} before Holm's adjustment (for an equivalence claim, the "
    "smallest margin it can show), from the observed variances; its range over the claim's comparisons.",
]

METHOD_NOTES = [
    "A and B: each run's value (one or two seeds) or mean ± std [95% t-interval] over the paired runs; Δ: the "
    "mean over pairs of the per-pair difference (a ratio A/B as the geometric mean of the pairs' ratios).",
    f"Examples: a cluster bootstrap over dev examples ({N_BOOT} resamples; one draw of example ids shared by every "
    "seed and both conditions, corpus metrics such as chrF recomputed per resample with sacreBLEU's statistics); "
    "its standard error gives the interval (±1.96 se) and a z-test. Seeds: Student's t over the per-pair effects.",
    f"A comparison decides only when both reject (intersection-union test: p is the larger of the two), so it "
    f"needs ≥ {MIN_PAIRS} paired runs; directional claims are tested two-sided at their point (0, or ±margin), the "
    "sign saying which way; equivalence by TOST (both one-sided tests at that level; 'beyond ±margin' tests "
    "the contrary).",
    f"On its own: the comparison's reading at level {ALPHA:g} before any adjustment (the claims' verdicts above "
    "are adjusted). Detectable (80%): (z(0.975) + z(0.8)) · se = 2.80 se for the bootstrap, the noncentral-t "
    "equivalent over seeds, the larger of the two; 'examples only' below 3 pairs, where no verdict is possible.",
]


def claims_section(doc: "Doc", study: StudyResults, study_dir: Path, out_dir: Path) -> None:
    """The report's Claims section (first): when the study's spec declares claims, the claims table
    and each comparison's test, with their CSV and LaTeX files."""
    spec = Path(study_dir) / "spec.yaml"
    if not spec.exists():
        return
    try:
        loaded = yaml.safe_load(spec.read_text(encoding="utf-8"))
        declared = loaded.get("claims") if isinstance(loaded, dict) else None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError("not a YAML mapping")
    except (UnicodeDecodeError, yaml.YAMLError, ValueError) as e:  # damaged: said, the rest of the report stands
        doc.h(2, "Claims")
        doc.p(f"Not tested: the study's `spec.yaml`, which declares its claims, is damaged ({type(e).__name__}); "
              "`sftdpo study run SPEC --out` this directory again rewrites it.")
        log.warning("%s is damaged (%s): the report's claims are not tested", spec, type(e).__name__)
        return
    claims = parse_claims(declared, f"study spec {spec}")
    if claims is None:
        return
    outcomes = evaluate_study(claims, study)
    doc.h(2, "Claims")
    verdicts = [o.verdict if o.results else "not tested" for o in outcomes]
    said = ", ".join(f"{verdicts.count(v)} {VERDICTS.get(v, v)}" for v in ("supported", "contradicted", "undecided",
                                                                           "not tested") if verdicts.count(v))
    doc.p(f"The paper's claims, pre-registered in the spec (`claims:` {claims.source}) and tested on this study's "
          f"paired runs: {said}. Undecided at this size means the study could not have told: the detectable "
          "effect says how large a difference it would have seen; more seeds and dev examples shrink it, and "
          "`sftdpo study run SPEC --dry-run` prints it before anything is trained.")
    summary, tests = claims_tables(outcomes, claims.source)
    for table in (summary, tests):
        if table is not None:
            table.write_csv(out_dir / f"{table.slug}.csv")
            table.write_tex(out_dir / f"{table.slug}.tex")
            doc.table(table)


# -- before running: the detectable effect of the design -----------------------------------------

def plan_lines(claims: ClaimSet, configs: list[RunConfig], dev_sizes: list[int]) -> list[str]:
    """What `study run --dry-run` prints per claim: each group of comparisons' detectable effect from
    the design (dev examples and paired seeds) and the claims' `assume:` values, before any run."""
    conditions = _conditions(configs, dev_sizes)
    a = claims.assume
    out = [f"claims ({claims.source}): the smallest effect each comparison can decide with {POWER:.0%} power at "
           f"two-sided level {ALPHA:g} (equivalence: the smallest margin it can show), before Holm's adjustment,",
           f"  assumed before any run: dev-pair discordance {a['discordance']:g}, chrF variance {a['chrf_variance']:g} "
           f"per dev example, wall-clock log-ratio sd {a['log_ratio_sd']:g}, training-seed sd {a['seed_sd']:g}"
           + (" (unknown yet: so these are lower bounds)" if a["seed_sd"] == 0 else "")]
    for claim in claims.claims:
        comps = comparisons(claim, conditions)
        groups: dict[str, int] = {}
        for comp in comps:
            n = len(comp.pairs)
            size = min(int(r["dev_examples"]) for pair in comp.pairs for r in pair) if comp.pairs else 0
            mde, exact = assumed_mde(claim, comp.metric, size, n, a)
            what = (f"{comp.task}{' (per device)' if comp.device or 'device' in claim.pool else ''} "
                    f"{_TITLES.get(comp.metric, comp.metric)}, "
                    + (f"{size:,} dev examples × {n} seed{'s' if n != 1 else ''}" if comp.metric in METRICS
                       else f"{n} paired run{'s' if n != 1 else ''}"))
            text = f"{what}: " + ("no test (no paired runs)" if mde is None else
                                  f"{_fmt_mde(claim, comp.metric, mde)} assumed" + (
                                      "" if exact else f" (examples only: a verdict needs >= {MIN_PAIRS} seeds)"))
            groups[text] = groups.get(text, 0) + 1
        margin = f", margin {_fmt_margin(claim, next(iter(claim.metric.values())))}" if claim.margin else ""
        head = f"  {claim.number} {claim.name} ({claim.kind}{margin})"
        if not comps:
            out.append(f"{head}: no comparison in this study")
            continue
        out.append(f"{head}: {len(comps)} comparison{'s' if len(comps) != 1 else ''}")
        out += [f"      {text}" + (f"  [{k} comparisons]" if k > 1 else "") for text, k in groups.items()]
    return out


def assumed_mde(claim: Claim, metric: str, n_examples: int, n_pairs: int,
                assume: dict[str, float]) -> tuple[float | None, bool]:
    """(detectable effect in display units, whether a verdict is possible) of a comparison with
    n_pairs paired runs on n_examples dev examples, from the assumed per-example variance (taken as
    independent between seeds, so the bootstrap's standard error is sqrt(var / (pairs × examples)))
    and training-seed sd."""
    equiv = claim.kind == "equivalent"
    if n_pairs == 0:
        return None, False
    if metric in METRICS:
        var = assume["chrf_variance"] if metric == "chrf" else assume["discordance"] * _SCALE[metric] ** 2
        if n_examples < 1:
            return None, False
        boot = mde_normal(math.sqrt(var / (n_pairs * n_examples)), equiv)
        if n_pairs < MIN_PAIRS:
            return boot, False
        seeds = mde_t(math.sqrt(var / n_examples + assume["seed_sd"] ** 2), n_pairs, equiv)
        return max(boot, seeds), True
    if n_pairs < MIN_PAIRS:
        return None, False
    return mde_t(assume["log_ratio_sd"], n_pairs, equiv), True


def _conditions(configs: list[RunConfig], dev_sizes: list[int]) -> list[Condition]:
    """Conditions of a study's runs before they run (runs carry their config and dev size)."""
    groups: dict[str, Condition] = {}
    for c, n in zip(configs, dev_sizes):
        d = c.to_dict()
        key = _cond_key(d)
        run = {"config": d, "dev_examples": n, "summary": None, "env": None}
        if key in groups:
            groups[key].runs.append(run)
        else:
            groups[key] = Condition({k: v for k, v in d.items() if k not in NON_CONDITION}, [run])
    return list(groups.values())
