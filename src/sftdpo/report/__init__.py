"""Paper-style report of a study: tables (Markdown, CSV, LaTeX), figures and significance tests,
all read from the study's index (study_dir/study.db).

Seeds of one condition are pooled into mean ± std with a bootstrap interval; differences between
conditions are tested with paired bootstraps over dev examples. Paper numbers are shown only when
the backbone is the paper's (GPT-2), because on another backbone a difference means nothing.

  results.py  conditions and labels      table.py    the table format and its cells
  tables.py   the tables                 figures.py  the figures
  paper.py    the paper's numbers
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from ..config import SftdpoError
from ..store import Store
from .figures import figure_fft_vs_lora, figure_handoff
from .paper import PAPER
from .results import StudyResults, _fmt_value
from .table import Table
from .tables import table_a, table_b, table_comparisons, table_cost, table_custom, table_data_scale, table_handoff

__all__ = ["PAPER", "write_report"]

# -- report ------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _fmt_value(v)
    return out


def _runs_section(study: StudyResults) -> list[str]:
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


def _setup_section(study: StudyResults) -> list[str]:
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
        return _write(study_dir, StudyResults(store))


def _write(study_dir: Path, study: StudyResults) -> Path:
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
    for task in study.tasks():
        if task not in ("paraphrase", "sonnet"):
            emit(f"Task {task}", table_custom(study, task), "")

    emit("SFT→DPO hand-off", table_handoff(study), "No finished runs; hand-off table omitted.")
    for task in study.tasks():
        figure("fig_handoff", figure_handoff, task, f"{task}: dev metric vs epoch per regime")

    md += ["## FFT vs LoRA at matched depth", ""]
    for task in study.tasks():
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

