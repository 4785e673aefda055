"""The report's runs and setup sections: what ran, what failed, and what a reader needs to rerun the
study (backbones and where their weights came from, each task's data and sizes, conventions,
hardware, package versions, the spec)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..models import weights_origin
from .results import StudyResults, _fmt_value, task_name

if TYPE_CHECKING:
    from . import Doc

def runs_section(doc: "Doc", study: StudyResults) -> None:
    counts = study.store.status_counts()
    doc.h(2, "Runs")
    doc.p(" · ".join(f"{s}: {n}" for s, n in counts.items()))
    failed = [r for r in study.all_runs if r["status"] == "failed"]
    if failed:
        doc.p("Failed runs:")
        doc.md_table(["Run", "Hash", "Error"], [
            [r["name"], f"`{r['run_hash']}`", (r["error"] or "(no error recorded)").strip().replace("\n", " ⏎ ")]
            for r in failed])
    for status in ("pending", "running"):
        names = [r["name"] for r in study.all_runs if r["status"] == status]
        if names:
            doc.p(f"{status.capitalize()} runs: " + ", ".join(names))


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _fmt_value(v)
    return out


def _counted(values: Counter) -> str:
    return "; ".join(f"{v} ({n} runs)" if len(values) > 1 else str(v) for v, n in sorted(values.items()))


def setup_section(doc: "Doc", study: StudyResults, study_dir: Path) -> None:
    doc.h(2, "Setup")
    models = Counter(str(r["config"].get("model")) for r in study.all_runs)
    doc.p("Backbones:")
    doc.items([f"`{m}` ({n} runs): {weights_origin(m)}" for m, n in sorted(models.items())])
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in study.done:
        by_task[task_name(r["config"])].append(r)
    if by_task:
        rows = []
        for task, runs in sorted(by_task.items()):
            sources = Counter(str(r["summary"].get("data_source", "not recorded")) for r in runs)
            sizes = Counter(f"{r['summary']['train_examples']:,} / {r['summary'].get('dev_examples', 0):,}"
                            if isinstance(r["summary"].get("train_examples"), int) else "not recorded" for r in runs)
            conv = Counter(_conventions(r["config"]) for r in runs)
            rows.append([task, _counted(sources), _counted(sizes), _counted(conv)])
        doc.p("Data (train / dev examples after filtering and subsetting) and conventions (docs/cs224n.md):")
        doc.md_table(["Task", "Data source", "Train / dev", "Conventions"], rows)
    envs: dict[str, Counter] = defaultdict(Counter)
    for r in study.done:
        for k, v in _flatten(r["env"] or {}).items():
            envs[k][v] += 1
    if envs:
        doc.p("Hardware and software (from finished runs):")
        doc.md_table(["Key", "Value(s)"], [[k, _counted(envs[k])] for k in sorted(envs)])
    else:
        doc.p("No environment recorded.")
    spec = study_dir / "spec.yaml"
    if spec.exists():
        doc.p("The study spec (`spec.yaml`; rerun with `sftdpo study run spec.yaml`, command-line `--set`/`--model` "
              "overrides are in each run's `run.json`):")
        doc.code(spec.read_text(encoding="utf-8", errors="replace"))  # damaged: shown as it is


def _conventions(cfg: dict) -> str:
    """The conventions a run followed; a field a run's config lacks (a study from before it existed)
    is left out rather than shown as None."""
    forms = ({"preprocess": "preprocess {}", "predict": "predict {}"} if cfg.get("task") in ("paraphrase", "classify")
             else {"temperature": "T={}", "top_p": "top-p {}", "max_new_tokens": "≤{} new tokens",
                   **({"prompt_newline": "prompt newline {}"} if cfg.get("task") == "sonnet" else {})})
    known = ", ".join(form.format(_fmt_value(cfg[k])) for k, form in forms.items() if cfg.get(k) is not None)
    name = str(cfg.get("conventions") or "sftdpo")
    return f"{name}: {known}" if known else name
