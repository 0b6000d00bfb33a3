"""The TinyR1-style table: rows base, branches, merge candidates, teacher; columns domains + mean.

Built from evaluate/results.json records {model, domain, n_prompts, n_samples, pass_at_1, stderr}.
Scores are shown as pass@1 x 100. The best value per column among the student models (the teacher
is the reference, not a contestant) is marked: bold in markdown, `*` in text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

TEACHER = "teacher"


def row_order(models: Sequence[str], domains: Sequence[str] = ()) -> list[str]:
    """base first, then branches (in domain order), merges, anything else, teacher last
    (otherwise in the order given)."""
    rank = {"base": 0, "branch": 1, "merge": 2, "merge+distill": 2.5, TEACHER: 4}
    doms = list(domains)

    def key(m: str):
        kind, _, name = m.partition(":")
        return rank.get(kind, 3), doms.index(name) if kind == "branch" and name in doms else 0

    return sorted(dict.fromkeys(models), key=key)


@dataclass
class Table:
    domains: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], float] = field(default_factory=dict)
    """(model, domain) -> pass@1 in [0, 1]; domain 'mean' is the mean over domains."""
    labels: dict[str, str] = field(default_factory=dict)
    """Display names of rows (e.g. 'merge:fusion (chosen)')."""
    errors: dict[tuple[str, str], float] = field(default_factory=dict)
    """(model, domain) -> standard error of the cell (the mean's: domains' errors combined)."""

    @property
    def columns(self) -> list[str]:
        return self.domains + ["mean"]

    def best(self, col: str) -> float | None:
        vals = [self.cells[(r, col)] for r in self.rows
                if r != TEACHER and (r, col) in self.cells]
        return max(vals) if vals else None

    def value(self, row: str, col: str) -> float | None:
        return self.cells.get((row, col))


def build_table(results: list[dict], domains: Sequence[str] | None = None,
                labels: dict[str, str] | None = None) -> Table:
    """A Table from results records; the mean column needs a score on every domain."""
    doms = list(domains) if domains else list(dict.fromkeys(r["domain"] for r in results))
    t = Table(domains=doms, rows=row_order([r["model"] for r in results], doms),
              labels=dict(labels or {}))
    for r in results:
        if r["domain"] in doms:
            t.cells[(r["model"], r["domain"])] = float(r["pass_at_1"])
            t.errors[(r["model"], r["domain"])] = float(r.get("stderr") or 0.0)
    for m in t.rows:
        vals = [t.cells.get((m, d)) for d in doms]
        if vals and all(v is not None for v in vals):
            t.cells[(m, "mean")] = sum(vals) / len(vals)
            t.errors[(m, "mean")] = math.sqrt(sum(t.errors.get((m, d), 0.0) ** 2 for d in doms)) / len(doms)
    return t


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _is_best(t: Table, row: str, col: str) -> bool:
    v, b = t.value(row, col), t.best(col)
    return row != TEACHER and v is not None and b is not None and abs(v - b) < 1e-12


def to_markdown(t: Table) -> str:
    head = "| model | " + " | ".join(t.columns) + " |"
    lines = [head, "|---|" + "---:|" * len(t.columns)]
    for r in t.rows:
        cells = [f"**{_fmt(t.value(r, c))}**" if _is_best(t, r, c) else _fmt(t.value(r, c))
                 for c in t.columns]
        lines.append(f"| {t.labels.get(r, r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_text(t: Table) -> str:
    """A fixed-width table for the console; `*` marks the best student per column."""
    names = [t.labels.get(r, r) for r in t.rows]
    w0 = max([len("model")] + [len(n) for n in names])
    ws = [max(len(c), 6) for c in t.columns]
    out = ["model".ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(t.columns, ws))]
    out.append("-" * len(out[0]))
    for r, name in zip(t.rows, names):
        cells = [(_fmt(t.value(r, c)) + ("*" if _is_best(t, r, c) else " ")).rjust(w + 1)
                 for c, w in zip(t.columns, ws)]
        out.append(name.ljust(w0) + " " + " ".join(cells))
    return "\n".join(out)


def details_markdown(results: list[dict], domains: Sequence[str] = ()) -> str:
    """Every record with its sample counts and standard error (pass@1 x 100)."""
    doms = list(domains) or sorted({r["domain"] for r in results})
    rows = row_order([r["model"] for r in results], doms)
    lines = ["| model | domain | prompts | samples/prompt | pass@1 | stderr | failed samples | unjudged samples |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (rows.index(r["model"]),
                                            doms.index(r["domain"]) if r["domain"] in doms else len(doms))):
        se = "-" if r.get("stderr") is None else f"{100 * r['stderr']:.1f}"
        lines.append(f"| {r['model']} | {r['domain']} | {r['n_prompts']} | {r['n_samples']} | "
                     f"{_fmt(r['pass_at_1'])} | {se} | {r.get('n_errors', 0)} | {r.get('n_infra', 0)} |")
    return "\n".join(lines)
