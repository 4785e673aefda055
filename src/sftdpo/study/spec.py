"""Study specs: a YAML file (or a shipped name) expanded into the distinct runs it describes.

A spec is `defaults` (RunConfig fields) + `grid` (field -> list of values; a value may be a
mapping that sets several fields at once, e.g. `{param: lora, lora_rank: 8}`) + `overrides`
(`{when: {field: value}, set: {...}}`, applied in order) + `exclude` (partial matches dropped).
Fields that cannot matter for a run (config.irrelevant_fields) are reset to their defaults, so the
grid never trains the same run twice; every run is identified by its config hash. `claims:` declares
the comparisons the report tests (report/claims.py).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import re
from pathlib import Path
from typing import Callable

import yaml

from ..config import FIELD_TYPES, LORA_PARAMS, RunConfig, SftdpoError, coerce_field, task_definition
from ..data import resolve_data
from ..report.claims import parse_claims

SHIPPED_SPECS = ("quick", "paper", "own-tasks", "dpo-sweep", "dpo-sweep-quick", "lr-sweep-quick", "findings", "methods",
                 "methods-quick")
_DEFAULTS = RunConfig()


# -- specs -------------------------------------------------------------------------------------

def load_spec(spec: str) -> dict:
    """A spec file path, or the name of a shipped spec."""
    if spec in SHIPPED_SPECS:
        text = importlib.resources.files("sftdpo").joinpath("specs").joinpath(f"{spec}.yaml").read_text()
        name = spec
    else:
        p = Path(spec)
        if not p.exists():
            raise SftdpoError(f"study spec {spec} not found: give a YAML file or one of {', '.join(SHIPPED_SPECS)}")
        try:
            text, name = p.read_text(encoding="utf-8-sig"), p.stem
        except UnicodeDecodeError:
            raise SftdpoError(f"study spec {spec} is not UTF-8 text") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SftdpoError(f"study spec {spec} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise SftdpoError(f"study spec {spec} must be a mapping with defaults/grid/overrides")
    unknown = set(d) - {"name", "description", "defaults", "grid", "overrides", "exclude", "order", "tasks", "aliases",
                        "claims"}
    if unknown:
        raise SftdpoError(f"study spec {spec}: unknown key(s) {', '.join(sorted(unknown))}")
    d.setdefault("name", name)
    return d


def _value(field: str, v: object) -> object:
    """A spec value as its field's type where it is one (so `lr: 1e-3` and 0.001 compare equal)."""
    try:
        return coerce_field(field, v)
    except SftdpoError:
        return v


def _matches(cfg: dict, when: dict) -> bool:
    for k, v in when.items():
        want = [_value(k, x) for x in (v if isinstance(v, list) else [v])]
        have = {_value(k, cfg.get(k, getattr(_DEFAULTS, k)))}
        if k == "task" and cfg.get("task_name"):  # a task the spec defines matches by its name too
            have.add(cfg["task_name"])
        if not have & set(want):
            return False
    return True


def check_spec(spec: dict) -> None:
    """The spec's shape, with one line for what is wrong: a grid with axes and values, conditions
    (`when`, `exclude`) that name config fields."""
    name = spec.get("name")
    fields = set(FIELD_TYPES)

    def bad(msg: str) -> SftdpoError:
        return SftdpoError(f"study spec {name}: {msg}")

    aliases = spec.get("aliases") or {}
    if not isinstance(aliases, dict) or set(aliases) - fields or not all(
            isinstance(a, str) and a.strip() and a == _sanitize(a) for a in aliases.values()):
        raise bad("`aliases` maps config fields to short names for run names (letters, digits, . _ + -), "
                  "e.g. `aliases: {top_p: p, dpo_lr: dlr}`")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise bad("its grid is empty: a study varies at least one field, e.g. `grid: {seed: [0, 1, 2]}` "
                  "(for a single run use `sftdpo train`)")
    for axis, values in grid.items():
        vals = values if isinstance(values, list) else [values]
        if not vals:
            raise bad(f"grid axis {axis!r} is an empty list: give it at least one value, or remove it")
        for v in vals:
            keys = set(v) if isinstance(v, dict) else {axis}
            if keys - fields:
                raise bad(f"grid axis {axis!r} sets {', '.join(sorted(map(str, keys - fields)))}, not a config field")
    parse_claims(spec.get("claims"), f"study spec {name}")  # pre-registered comparisons (report/claims.py)
    for kind in ("overrides", "exclude"):
        items = spec.get(kind) or []
        if not isinstance(items, list):
            raise bad(f"`{kind}` must be a list")
        for i, item in enumerate(items):
            cond = (item or {}).get("when") if kind == "overrides" else item
            if kind == "overrides" and not isinstance(item, dict):
                raise bad(f"overrides[{i}] must be a mapping with `when` and `set`")
            if not isinstance(cond or {}, dict):
                raise bad(f"{kind}[{i}] must be a mapping of config fields to values")
            unknown = set(cond or {}) - fields
            if unknown:
                where = f"overrides[{i}].when" if kind == "overrides" else f"exclude[{i}]"
                raise bad(f"{where} names {', '.join(sorted(map(str, unknown)))}, which is not a config field "
                          "(so it would never match)")


def expand(spec: dict, overrides: dict | None = None) -> list[tuple[str, RunConfig]]:
    """(name, config) for every distinct run, in a deterministic order."""
    check_spec(spec)
    defaults = dict(spec.get("defaults") or {})
    grid = spec.get("grid") or {}
    axes = [(k, v if isinstance(v, list) else [v]) for k, v in grid.items()]
    runs: dict[str, tuple[str, RunConfig]] = {}
    for combo in itertools.product(*[vals for _, vals in axes]):
        cfg = dict(defaults)
        for (axis, _), value in zip(axes, combo):
            if isinstance(value, dict):
                cfg.update(value)
            else:
                cfg[axis] = value
        tasks = spec.get("tasks") or {}
        if cfg.get("task") in tasks:  # a task the spec defines by name: its fields, under that name
            cfg.update(task_definition(tasks[cfg["task"]], f"study spec {spec.get('name')}: tasks.{cfg['task']}",
                                       cfg["task"]))
        for ov in spec.get("overrides") or []:
            if _matches(cfg, ov.get("when") or {}):
                cfg.update(ov.get("set") or {})
        if any(_matches(cfg, ex) for ex in spec.get("exclude") or []):
            continue
        cfg.update(overrides or {})
        try:
            rc = RunConfig.from_dict(cfg).normalised().validate()
        except (SftdpoError, TypeError) as e:
            hint = ""
            if "--handoff-epoch" in str(e) and "epochs" in (overrides or {}) and "handoff_epoch" not in (overrides or {}):
                hint = " (a shorter budget needs its hand-off too, e.g. --set epochs=2 --set handoff_epoch=1)"
            raise SftdpoError(f"study spec {spec.get('name')}: grid point {_short(cfg)} is invalid: {e}{hint}") from None
        runs.setdefault(rc.hash(), rc)
    return name_runs(list(runs.values()), spec.get("aliases"))


def resolve_runs(cfgs: list[RunConfig], aliases: dict | None = None) -> list[tuple[str, RunConfig]]:
    """(name, config) of each run with its data resolved (data.resolve_data: absolute paths and a
    fingerprint of the examples, so the name says which data the run reads); each data source is
    read once."""
    memo: dict = {}
    return name_runs([resolve_data(c, memo) for c in cfgs], aliases)


def _short(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items() if getattr(_DEFAULTS, k, object()) != v)


# -- run names ---------------------------------------------------------------------------------
# Fields every name spells out in its own short form (or that only say where data lives, which the
# data fingerprint covers); any other field is added to the names of the runs it tells apart.
_IN_BASE = {"task", "task_name", "regime", "handoff_epoch", "param", "lora_rank", "objective", "pairs", "data_fraction",
            "seed", "train", "dev"}
_ALIASES = {"data_fingerprint": "data"}


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("_")


def _short_value(field: str, v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(_short_value(field, x) for x in v)
    if field == "data_fingerprint" and isinstance(v, str):
        return v[:8]
    if isinstance(v, str) and ("/" in v or "\\" in v):
        return Path(v.removeprefix("file:")).name
    return str(v)


def name_runs(cfgs: list[RunConfig], aliases: dict | None = None) -> list[tuple[str, RunConfig]]:
    """(name, config) per distinct run: `task-regime-param[-pairs][-fracF]` (regime: sft, dpo, sft1-dpo,
    or another preference objective in dpo's place, e.g. sft1-orpo; param: fft, lora8, dora8, ia3, ...),
    then each other field whose value differs between runs that would otherwise share that name
    (`field=value`, or the spec's `aliases:` short form, `alias=value`), then the seed and the hash."""
    aliases = {**_ALIASES, **(aliases or {})}
    unique = list({c.hash(): c for c in cfgs}.values())
    idents = {c.hash(): c.identity() for c in unique}
    groups: dict[str, list[dict]] = {}
    for c in unique:
        groups.setdefault("-".join(_base_name(c)), []).append(idents[c.hash()])
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _IN_BASE]
    varied = {base: [k for k in keys if len({repr(i.get(k)) for i in group}) > 1] for base, group in groups.items()}
    names = []
    for c in unique:
        base, own = _base_name(c), idents[c.hash()]
        extra = [f"{aliases.get(k, k)}={_sanitize(_short_value(k, own.get(k)))}" for k in varied["-".join(base)]]
        names.append(("-".join([*base, *extra, f"s{c.seed}", c.hash()]), c))
    return names


def _base_name(c: RunConfig) -> list[str]:
    stage = c.objective or "dpo"  # the preference stage's objective: dpo, simpo, cpo, orpo, kto
    regime = "sft" if c.regime == "sft" else stage if c.regime == "dpo" else f"sft{c.handoff_epoch}-{stage}"
    param = c.param.replace("-", "") + (str(c.lora_rank) if c.param in LORA_PARAMS else "")
    parts = [c.task_name or c.task, regime, param]
    if c.regime != "sft" and c.task in ("sonnet", "generate", "classify") and c.pairs != "v1":
        parts.append(c.pairs.split("/")[-1].replace(":", "-") if c.pairs.startswith("file:") else c.pairs)
    elif c.regime != "sft" and c.task == "sonnet":
        parts.append(c.pairs)
    if c.data_fraction != 1.0:
        parts.append(f"frac{c.data_fraction:g}")
    return parts


def parse_only(filters: list[str]) -> Callable[[RunConfig], bool]:
    conds: list[tuple[str, str]] = []
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for f in filters:
        if "=" not in f:
            raise SftdpoError(f"--only {f!r}: use FIELD=VALUE (e.g. --only task=sonnet)")
        k, v = f.split("=", 1)
        k = k.replace("-", "_")
        if k not in names:
            raise SftdpoError(f"--only {f!r}: {k} is not a config field")
        conds.append((k, v))
    def keep(c: RunConfig) -> bool:
        for k, v in conds:
            have = {str(getattr(c, k))} | ({c.task_name} if k == "task" and c.task_name else set())
            if not have & set(v.split(",")):
                return False
        return True

    return keep


def parse_set(items: list[str]) -> dict:
    """--set FIELD=VALUE overrides for every run (values parsed as YAML scalars)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise SftdpoError(f"--set {it!r}: use FIELD=VALUE (e.g. --set epochs=2)")
        k, v = it.split("=", 1)
        out[k.replace("-", "_")] = yaml.safe_load(v)
    return out
