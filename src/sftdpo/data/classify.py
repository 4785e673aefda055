"""Your own classification data (`--task classify`): rows with a label column and the columns the
`--template` names, from files or a Hugging Face dataset."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig, SftdpoError
from .records import Row, dataset_rows, read_rows, require_columns


@dataclass(frozen=True)
class ClassifyExample:
    id: str
    fields: dict[str, Any] = field(hash=False)  # the row's columns
    label: str  # the label value, as --labels names it ("1.0" in a file is "1")


@dataclass
class ClassifyData:
    train: list[ClassifyExample]
    dev: list[ClassifyExample]
    source: str
    dev_dropped_overlap: int = 0  # dev rows dropped because train holds the same fields


def template_fields(template: str) -> list[str]:
    """The {column} names a template fills, in order (each once)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise SftdpoError(f"--template is not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise SftdpoError(f"--template field {{{bad[0]}}} is not a column name: use {{column}} with the column's name")
    return list(dict.fromkeys(names))


def label_value(v: Any) -> str:
    """A label as text: integer-valued numbers without a fraction (1, 1.0 and "1.0" are all "1")."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = str(v).strip()
    try:
        f = float(s)
        if f.is_integer() and "." in s:
            return str(int(f))
    except ValueError:
        pass
    return s


def parse_labels(spec: str) -> list[tuple[str, str]]:
    """--labels "0=no,1=yes" -> [("0", "no"), ("1", "yes")] (the order is the tie-break order)."""
    out: list[tuple[str, str]] = []
    for part in spec.split(","):
        if "=" not in part:
            raise SftdpoError(f"--labels {spec!r}: write VALUE=WORD pairs separated by commas, e.g. 0=no,1=yes")
        value, word = part.split("=", 1)
        out.append((label_value(value), word.strip()))
    values, words = [v for v, _ in out], [w for _, w in out]
    if len(out) < 2 or len(set(values)) != len(values) or len(set(words)) != len(words) or not all(words):
        raise SftdpoError(f"--labels {spec!r}: give two or more different values, each with its own word")
    return out


def _examples(rows: list[Row], cfg: RunConfig, split: str) -> list[ClassifyExample]:
    columns = template_fields(cfg.template or "")
    require_columns(rows, [*columns, cfg.label_column], f"--template and --label-column need it ({split} data)")
    known = {v for v, _ in parse_labels(cfg.labels or "")}
    out = []
    for i, r in enumerate(rows):
        value = label_value(r.fields[cfg.label_column])
        if value not in known:
            raise SftdpoError(f"{r.where}: label {value!r} has no word in --labels {cfg.labels}; add {value}=WORD "
                              "(or drop such rows)")
        rid = r.fields.get(cfg.id_column)
        out.append(ClassifyExample(str(rid) if rid is not None else f"{split}-{i}", dict(r.fields), value))
    if not out:
        raise SftdpoError(f"the {split} data has no rows")
    return out


def _key(e: ClassifyExample, columns: list[str]) -> tuple:
    return tuple(" ".join(str(e.fields[c]).lower().split()) for c in columns)


def load_classify_data(cfg: RunConfig) -> ClassifyData:
    """Train and dev examples of a classify task; dev rows whose template fields equal a train row's
    (case and whitespace folded) are dropped and counted, so dev accuracy is not inflated."""
    if cfg.dataset:
        tr_rows, dv_rows = dataset_rows(cfg.dataset, cfg.train_split), dataset_rows(cfg.dataset, cfg.dev_split)
        source = f"dataset {cfg.dataset} (splits {cfg.train_split}, {cfg.dev_split})"
    else:
        tr_rows, dv_rows = read_rows(cfg.train, cfg.train_split), read_rows(cfg.dev, cfg.dev_split)
        source = f"files: train={cfg.train}, dev={cfg.dev}"
    train, dev = _examples(tr_rows, cfg, "train"), _examples(dv_rows, cfg, "dev")
    columns = template_fields(cfg.template or "")
    seen = {_key(e, columns) for e in train}
    kept = [e for e in dev if _key(e, columns) not in seen]
    if not kept:
        raise SftdpoError(f"every dev row also occurs in train ({source}): is the dev data the train data?")
    return ClassifyData(train, kept, f"{source}: {len(train):,} train, {len(kept):,} dev rows", len(dev) - len(kept))
