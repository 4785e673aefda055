"""A report table: Markdown, CSV (numeric, one column per statistic) and LaTeX; and its cells over seeds."""

from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from ..files import atomic_path
from ..stats import t_interval

# -- cells and tables --------------------------------------------------------------------------

MIN_SEEDS_FOR_INTERVAL = 3
INTERVAL_NAME = "95% Student-t interval of the mean over seeds"


@dataclass
class Stat:
    """One table cell over seeds. One or two seeds: their values (an interval from two numbers would
    be their range); from three seeds: mean ± std [95% t-interval] (n=k)."""

    values: list[float]
    decimals: int = 2

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def n(self) -> int:
        return len(self.values)

    def interval(self) -> tuple[float, float, float, float] | None:
        """(mean, std, lo, hi) from three seeds on, else None."""
        if self.n < MIN_SEEDS_FOR_INTERVAL:
            return None
        return t_interval(self.values)

    def __str__(self) -> str:
        d = self.decimals
        if self.n < MIN_SEEDS_FOR_INTERVAL:
            return ", ".join(f"{v:.{d}f}" for v in self.values) + f" (n={self.n})"
        m, s, lo, hi = self.interval()
        return f"{m:.{d}f} ± {s:.{d}f} [{lo:.{d}f}, {hi:.{d}f}] (n={self.n})"


def _stat(values: list[float | None], decimals: int = 2) -> Stat | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return Stat(vals, decimals) if vals else None


Cell = str | Stat | None


@dataclass
class Table:
    """A report table. `best`: column titles whose highest mean (among rows not in `reference_rows`,
    e.g. the untrained baseline) is marked bold."""

    slug: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    best: tuple[str, ...] = ()
    reference_rows: int = 0  # the first rows are references (not candidates for "best")

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

    def best_cells(self) -> set[tuple[int, int]]:
        """(row, column) of each `best` column's highest mean (every tied cell)."""
        out = set()
        for name in self.best:
            if name not in self.columns:
                continue
            j = self.columns.index(name)
            cands = [(i, r[j].mean) for i, r in enumerate(self.rows) if i >= self.reference_rows and isinstance(r[j], Stat)]
            if len(cands) > 1:
                top = max(m for _, m in cands)
                out |= {(i, j) for i, m in cands if m == top}
        return out

    def numeric(self, j: int) -> bool:
        return any(isinstance(r[j], Stat) for r in self.rows) or all(
            _is_number(r[j]) for r in self.rows if r[j] not in (None, ""))

    def markdown(self) -> str:
        bold = self.best_cells()

        def cell(i: int, j: int, c: Cell) -> str:
            text = ("—" if c is None or c == "" else str(c)).replace("|", "\\|")
            return f"**{text}**" if (i, j) in bold else text

        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---:" if self.numeric(j) else "---" for j in range(len(self.columns))) + "|"]
        out += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(r)) + " |" for i, r in enumerate(self.rows)]
        out += [""] + [f"_{n}_  " for n in self.notes]
        out.append(f"Files: `{self.slug}.csv`, `{self.slug}.tex`")
        return "\n".join(out)

    def html(self) -> str:
        bold = self.best_cells()
        head = "".join(f"<th>{escape(c)}</th>" for c in self.columns)
        body = []
        for i, r in enumerate(self.rows):
            tds = []
            for j, c in enumerate(r):
                text = escape("—" if c is None or c == "" else str(c))
                text = f"<b>{text}</b>" if (i, j) in bold else text
                tds.append(f'<td class="{"num" if self.numeric(j) else "txt"}">{text}</td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        notes = "".join(f"<p class=\"note\">{escape(n)}</p>" for n in self.notes)
        return (f"<p class=\"caption\">{escape(self.title)}</p><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>{notes}")

    def write_csv(self, path: Path) -> None:
        """Stat columns become mean/std/ci_lo/ci_hi/n columns so the CSV stays numeric (std from two
        seeds, the interval from three)."""
        stat_cols = {j for j in range(len(self.columns)) if any(isinstance(r[j], Stat) for r in self.rows)}
        header: list[str] = []
        for j, c in enumerate(self.columns):
            header += [f"{c} {s}" for s in ("mean", "std", "ci_lo", "ci_hi", "n")] if j in stat_cols else [c]
        with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for r in self.rows:
                row: list[Any] = []
                for j, c in enumerate(r):
                    if j not in stat_cols:
                        row.append("" if c is None else str(c))
                    elif isinstance(c, Stat):
                        iv = c.interval()
                        std = statistics.stdev(c.values) if c.n > 1 else ""
                        row += [round(c.mean, 6), "" if std == "" else round(std, 6),
                                *(["", ""] if iv is None else [round(iv[2], 6), round(iv[3], 6)]), c.n]
                    else:
                        row += ["", "", "", "", 0]
                w.writerow(row)

    def tex(self) -> str:
        """A booktabs table: text columns left, numbers right, each `best` column's top value bold."""
        bold = self.best_cells()

        def cell(i: int, j: int, c: Cell) -> str:
            text = _NEGATIVE.sub(r"\1$-$", _tex("--" if c is None or c == "" else str(c)))  # a minus, not a hyphen
            return f"\\textbf{{{text}}}" if (i, j) in bold else text

        spec = "".join("r" if self.numeric(j) else "l" for j in range(len(self.columns)))
        body = [" & ".join(_tex(c) for c in self.columns) + r" \\", r"\midrule"]
        body += [" & ".join(cell(i, j, c) for j, c in enumerate(r)) + r" \\" for i, r in enumerate(self.rows)]
        notes = "".join(f"\n\\par\\smallskip{{\\footnotesize {_tex(n)}}}" for n in self.notes)
        return ("% generated by sftdpo report; needs \\usepackage{booktabs} (\\toprule, \\midrule, \\bottomrule).\n"
                "% Wider than a column: use table* in a two-column layout, or scale it with \\resizebox (graphicx).\n"
                f"\\begin{{table}}[ht]\n\\centering\n\\small\n\\caption{{{_tex(self.title)}}}\n\\label{{tab:{self.slug}}}\n"
                f"\\begin{{tabular}}{{{spec}}}\n\\toprule\n" + "\n".join(body)
                + f"\n\\bottomrule\n\\end{{tabular}}{notes}\n\\end{{table}}\n")

    def write_tex(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(self.tex(), encoding="utf-8")


def _is_number(c: Cell) -> bool:
    try:
        float(str(c).replace(",", "").replace("%", "").split(" ")[0].lstrip("+"))
        return True
    except ValueError:
        return False


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
        "±": r"$\pm$", "Δ": r"$\Delta$", "→": r"$\rightarrow$", "–": "--", "—": "---", "−": "$-$",
        "≤": r"$\le$", "≥": r"$\ge$", "·": r"$\cdot$", "×": r"$\times$", "≈": r"$\approx$", "⏎": " "}


_NEGATIVE = re.compile(r"(^|[\s/(\[])-(?=\d)")


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))
