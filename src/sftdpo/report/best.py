"""`sftdpo study best`: the best condition of each group of a study (task × backbone ×
parameterization), chosen on a dev metric's seed mean, written as a run config file that
`sftdpo train --config` accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import RunConfig, SftdpoError
from ..files import write_text_atomic
from .results import Condition, StudyResults, best_of, param_label, primary_metric

_DEFAULTS = RunConfig().to_dict()


@dataclass
class Best:
    task: str
    model: str
    param: str
    metric: str
    cond: Condition
    config: dict  # the run config of the condition's first seed, fields at their defaults left out
    candidates: int

    @property
    def slug(self) -> str:
        param = "fft" if self.cond.cfg.get("param") == "fft" else f"lora{self.cond.cfg.get('lora_rank')}"
        return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{self.task}-{self.model}-{param}").strip("_")

    def yaml(self) -> str:
        stat = self.cond.stat(self.metric)
        seeds = ", ".join(str(r["config"].get("seed")) for r in self.cond.runs)
        head = (f"# sftdpo study best: {self.task}, {self.model}, {self.param}: best {self.metric} = "
                f"{stat.mean:.4g} (mean of seeds {seeds}) among {self.candidates} conditions\n"
                f"# train it with: sftdpo train --config <this file> [--seed N]\n")
        return head + yaml.safe_dump(self.config, sort_keys=False)


def _metric_key(metric: str | None, cond: Condition) -> str:
    if metric is None:
        return primary_metric(cond.cfg)[0]
    return metric if metric.startswith(("dev/", "best/")) else f"dev/{metric}"


def best_configs(study: StudyResults, metric: str | None = None) -> list[Best]:
    """Per task × backbone × parameterization, the condition with the highest seed mean of `metric`
    (default: the task's primary dev metric) among the study's headline conditions."""
    out: list[Best] = []
    known: set[str] = set()
    for task in study.tasks():
        groups: dict[tuple, list[Condition]] = {}
        for c in study.main_conditions(task):
            groups.setdefault((c.cfg.get("model"), param_label(c.cfg)), []).append(c)
        for (model, param), conds in groups.items():
            key = _metric_key(metric, conds[0])
            known |= {k for c in conds for r in c.runs for k in (r["summary"] or {}) if k.startswith("dev/")}
            best = best_of(conds, key)
            if best is None:
                continue
            run = best.runs[0]
            cfg = RunConfig.from_dict(run["config"]).to_dict()
            cfg.pop("data_fingerprint", None)  # `train` fingerprints the data it finds
            config = {k: v for k, v in cfg.items() if v != _DEFAULTS.get(k)}
            out.append(Best(task, str(model), param, key, best, config, len(conds)))
    if not out:
        if not study.conditions:
            raise SftdpoError("no finished runs in this study yet: run it first (sftdpo study run SPEC --out DIR)")
        raise SftdpoError(f"no finished run reports {metric!r}; known dev metrics: {', '.join(sorted(known))}")
    return out


def write_best(study: StudyResults, out_dir: Path, metric: str | None = None) -> list[tuple[Best, Path]]:
    """Each group's best config as `<out_dir>/<task>-<model>-<param>.yaml`."""
    written = []
    for b in best_configs(study, metric):
        path = Path(out_dir) / f"{b.slug}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, b.yaml())
        written.append((b, path))
    return written
