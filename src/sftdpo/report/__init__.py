"""Paper-style report of a study: tables (Markdown, CSV, LaTeX), figures (PNG, PDF, SVG) and
significance tests, all read from the study's index (study_dir/study.db), as `report.md` and one
self-contained `report.html` (figures embedded).

Seeds of one condition: their values below three seeds, mean ± std with a 95% Student-t interval from
three; differences between conditions are tested with paired bootstraps over dev examples (Holm's
adjustment when several are shown). Paper numbers are shown only when the backbone is the paper's
(GPT-2), because on another backbone a difference means nothing.

  results.py  conditions and labels      table.py    the table format and its cells
  tables.py   the tables                 figures.py  the figures
  paper.py    the paper's numbers        setup.py    what a reader needs to rerun the study
  sweep.py    DPO hyper-parameter and hand-off sweeps: heat maps, metric vs k, selected settings
  claims.py   the paper's claims (a spec's `claims:`) tested: the Claims section, first
  methods.py  a study over --param / --objective: the method table and cost-vs-quality figure
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from ..config import SftdpoError
from ..files import is_write_failure, replace_files, write_failure
from ..store import Store
from .claims import claims_section
from .figures import figure_fft_vs_lora, figure_handoff, save
from .methods import figure_methods, table_methods
from .paper import PAPER
from .results import StudyResults
from .setup import runs_section, setup_section
from .sweep import ALPHA, figure_handoff_k, figure_heatmap, study_sweeps, sweep_summary, table_selected
from .table import INTERVAL_NAME, MIN_SEEDS_FOR_INTERVAL, Table
from .tables import table_a, table_b, table_comparisons, table_cost, table_custom, table_data_scale, table_handoff

__all__ = ["PAPER", "Doc", "write_report"]


@dataclass
class Doc:
    """The report as blocks, rendered as Markdown and as self-contained HTML."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def md_table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("grid", header, rows))

    def figure(self, png: Path, caption: str, others: list[Path]) -> None:
        self.blocks.append(("figure", png, caption, others))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out: list[str] = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif kind == "p":
                out += [b[1], ""]
            elif kind == "ul":
                out += [f"- {x}" for x in b[1]] + [""]
            elif kind == "table":
                out += [b[1].markdown(), ""]
            elif kind == "grid":
                cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
                out += ["| " + " | ".join(b[1]) + " |", "|" + "|".join("---" for _ in b[1]) + "|"]
                out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in b[2]] + [""]
            elif kind == "figure":
                also = ", ".join(f"`{p.name}`" for p in b[3])
                out += [f"![{b[2]}]({b[1].name})", "", f"_{b[2]}. Vector: {also}._", ""]
            elif kind == "code":
                out += ["```", b[1].rstrip(), "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
               f"<style>{_CSS}</style></head><body>"]
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append(f"<h{b[1]}>{escape(b[2])}</h{b[1]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif kind == "table":
                out.append(b[1].html())
            elif kind == "grid":
                head = "".join(f"<th>{escape(str(x))}</th>" for x in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{escape(str(x))}</td>" for x in r) + "</tr>" for r in b[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "figure":
                data = base64.b64encode(b[1].read_bytes()).decode()
                out.append(f"<figure><img alt=\"{escape(b[2])}\" src=\"data:image/png;base64,{data}\">"
                           f"<figcaption>{escape(b[2])}</figcaption></figure>")
            elif kind == "code":  # folded: the spec is for rerunning, not for reading first
                out.append(f"<details><summary>show</summary><pre>{escape(b[1])}</pre></details>")
        out.append("</body></html>")
        return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
        "table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #ddd}"
        "th{border-bottom:2px solid #444;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}"
        ".caption{font-weight:600;margin-bottom:.2em}.note{font-size:12px;color:#555;margin:.2em 0}"
        "figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}"
        "pre{background:#f6f6f6;padding:.6em;font-size:12px;overflow-x:auto}code{background:#f3f3f3}")


def _inline(text: str) -> str:
    """`code` and a paragraph in _emphasis_ of the report's Markdown, as HTML."""
    em = len(text) > 2 and text.startswith("_") and text.endswith("_")
    parts = escape(text[1:-1] if em else text).split("`")
    html = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return f"<em>{html}</em>" if em else html


def _report_file(name: str) -> bool:
    """A file of a report (a previous report's that the new one lacks is removed: no vanished table or
    figure lingers)."""
    return name in ("report.md", "report.html") or name.startswith(("table_", "fig_"))


def write_report(study_dir: Path, store: Store | None = None, out: Path | None = None) -> Path:
    """Write the report of the study in `study_dir` from its index `store` (default: study_dir/study.db)
    into `out` (default: study_dir/report/): report.md, report.html, tables as .csv/.tex, figures as
    .png/.pdf/.svg. The previous report stays until the new one is complete (files.replace_files).
    Returns report.md."""
    study_dir = Path(study_dir)
    out_dir = Path(out) if out is not None else study_dir / "report"
    if store is None:
        db = study_dir / "study.db"
        if not db.exists():
            raise SftdpoError(f"no study database at {db}; run the study first")
        with Store(db) as own:
            return write_report(study_dir, own, out_dir)
    study = StudyResults(store)
    try:
        replace_files(out_dir, lambda tmp: _write(study_dir, study, tmp), stale=_report_file)
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise write_failure(e, f"the report in {out_dir}", "the previous report there is as it was") from None
    return out_dir / "report.md"


def _write(study_dir: Path, study: StudyResults, out_dir: Path) -> None:
    doc = Doc()
    doc.h(1, f"Study report: {study_dir.name}")
    doc.p(f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from `study.db`: "
          f"{len(study.done)} finished runs in {len(study.conditions)} conditions (a condition = all config "
          "fields except the seed). Cells over seeds: each seed's value with one or two seeds (n=1, n=2); from "
          f"{MIN_SEEDS_FOR_INTERVAL} seeds, mean ± std [{INTERVAL_NAME}] (n seeds). Accuracy/F1 in percent, "
          "chrF and BLEU 0–100.")
    claims_section(doc, study, study_dir, out_dir)  # first: what the study says about the paper's claims
    runs_section(doc, study)

    def emit(heading: str, table: Table | None, missing: str) -> None:
        doc.h(2, heading)
        if table is None:
            if missing:
                doc.p(missing)
            return
        table.write_csv(out_dir / f"{table.slug}.csv")
        table.write_tex(out_dir / f"{table.slug}.tex")
        doc.table(table)

    def figure(stem: str, fig, caption: str, missing: str) -> None:
        paths = save(fig, out_dir / f"{stem}.png")
        if paths:
            doc.figure(paths[0], caption, paths[1:])
        elif missing:
            doc.p(f"_{missing}_")

    emit("Table A: paraphrase", table_a(study), "No finished paraphrase runs; Table A omitted.")
    b_tables = table_b(study)
    emit("Table B: sonnets", b_tables[0] if b_tables else None, "No finished sonnet runs; Table B omitted.")
    for t in b_tables[1:]:
        emit("Table B2: sonnets by decoding temperature", t, "")
    for task in study.tasks():
        if task not in ("paraphrase", "sonnet"):
            emit(f"Task {task}", table_custom(study, task), "")

    emit("SFT→DPO hand-off", table_handoff(study), "No finished runs; hand-off table omitted.")
    curves = "needs epoch curves of the conditions compared"
    for task in study.tasks():
        figure(f"fig_handoff_{task}", figure_handoff(study, task), f"{task}: dev metrics vs epoch per regime",
               f"No {task} figure: dev metrics vs epoch per regime {curves}.")

    doc.h(2, "FFT vs LoRA at matched depth")
    for task in study.tasks():
        figure(f"fig_fft_vs_lora_{task}", figure_fft_vs_lora(study, task), f"{task}: FFT vs LoRA",
               f"No {task} figure: FFT vs LoRA {curves}.")
    if not study.conditions:
        doc.p("No finished runs; figures omitted.")

    sweeps = study_sweeps(study)
    if sweeps:
        doc.h(2, "DPO hyper-parameters and hand-off timing")
        doc.p("Sweeps (per task and group of conditions that differ only in β, DPO learning rate and hand-off "
              "epoch k; k = 0 is DPO-only):")
        doc.items([sweep_summary(g) for g in sweeps])
        for g in sweeps:
            figure(f"fig_heatmap_{g.slug}", figure_heatmap(study, g),
                   f"{g.task}, {g.title}: final dev metric over β × DPO learning rate per hand-off k. Colour: "
                   "blue above the SFT-only value (the line on the colour bar), red below; thick box: the best "
                   "cell of a row; thin boxes: cells a paired bootstrap cannot tell from it (Holm-adjusted "
                   f"p ≥ {ALPHA:g}; none for metrics without a test); hatched: no run", "")
        for task in study.tasks():
            figure(f"fig_handoff_k_{task}", figure_handoff_k(study, task, [g for g in sweeps if g.task == task]),
                   f"{task}: final dev metric against the hand-off epoch k, at the best β and DPO learning rate "
                   "of each k, beside the SFT-only run's dev curve", "")
        emit("Selected settings", table_selected(study, sweeps), "")

    methods = table_methods(study)
    if methods is not None:
        emit("Method comparison", methods, "")
        for task in study.tasks():
            figure(f"fig_methods_{task}", figure_methods(study, task),
                   f"{task}: final dev metric against trainable parameters and wall-clock per epoch, one point per "
                   "method and regime (bars ±1 std over seeds); dashed: FFT of the same regime; dotted: untrained", "")
    emit("Cost", table_cost(study), "No finished runs; cost table omitted.")
    emit("Data scale", table_data_scale(study),
         "No condition was run at several data fractions; data-scale table omitted.")
    comp, skipped = table_comparisons(study)
    emit("Key comparisons (paired bootstrap)", comp,
         "No pair of conditions with matching seeds and dev outputs; key comparisons omitted. "
         "(The paper reports no significance tests.)")
    if skipped:
        doc.p("Comparisons not tested:")
        doc.items(skipped)
    setup_section(doc, study, study_dir)

    (out_dir / "report.md").write_text(doc.markdown(), encoding="utf-8")
    (out_dir / "report.html").write_text(doc.html(f"Study report: {study_dir.name}"), encoding="utf-8")
