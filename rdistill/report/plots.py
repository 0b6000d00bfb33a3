"""The report's figures as PNG files (matplotlib's Agg backend: no display needed).

Each function takes plain data (so the notebook and tests can call them directly), writes one
PNG and returns its path, or None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from rdistill.report.table import Table  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_bars(t: Table, path: Path) -> Path | None:
    """Grouped bars: pass@1 (%) per column (domains, mean), one bar per model, with one
    standard error either side."""
    if not t.rows:
        return None
    cols = t.columns
    width = 0.8 / len(t.rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cols) + 0.4 * len(t.rows)), 4.6))
    for i, r in enumerate(t.rows):
        vals = [100 * (t.value(r, c) or 0.0) for c in cols]
        errs = [100 * t.errors.get((r, c), 0.0) for c in cols]
        xs = [j + (i - (len(t.rows) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, error_kw={"elinewidth": 0.8},
               label=t.labels.get(r, r))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per domain (± one standard error)")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return _save(fig, path)


def token_histograms(lengths: Mapping[str, Sequence[int]], path: Path) -> Path | None:
    """One histogram per domain of the completion lengths (tokens) of the kept SFT samples."""
    doms = [d for d, v in lengths.items() if len(v)]
    if not doms:
        return None
    fig, axes = plt.subplots(1, len(doms), figsize=(4 * len(doms), 3.2), squeeze=False)
    for ax, d in zip(axes[0], doms):
        v = list(lengths[d])
        ax.hist(v, bins=min(30, max(5, len(set(v)))), color="tab:blue", alpha=0.8)
        ax.set_title(f"{d}: {len(v)} samples, median {sorted(v)[len(v) // 2]}")
        ax.set_xlabel("completion tokens")
    axes[0][0].set_ylabel("samples")
    return _save(fig, path)


def loss_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path) -> Path | None:
    """Training loss against optimizer step, one line per branch."""
    curves = {d: c for d, c in curves.items() if len(c)}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for d, c in curves.items():
        steps, losses = zip(*c)
        ax.plot(steps, losses, label=f"branch:{d}", marker="." if len(c) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Branch training loss")
    ax.legend()
    return _save(fig, path)


def funnel_bars(funnels: Mapping[str, Sequence[tuple[str, int]]], path: Path) -> Path | None:
    """Per domain, how many samples are left after each verification step, in pipeline order
    (generated at the top, kept at the bottom)."""
    funnels = {d: f for d, f in funnels.items() if f}
    if not funnels:
        return None
    fig, axes = plt.subplots(1, len(funnels), figsize=(4 * len(funnels), 3.4), squeeze=False)
    for ax, (d, steps) in zip(axes[0], funnels.items()):
        labels, counts = zip(*steps)
        ax.barh(range(len(counts)), counts, color="tab:green")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(d)
        ax.set_xlabel("samples")
    return _save(fig, path)


def dev_curve(curve: Sequence[dict], path: Path) -> Path | None:
    """Dev pass@1 per domain (± one standard error) against the distill round (0: the merge)."""
    if len(curve) < 2:
        return None
    doms = sorted({d for c in curve for d in c["dev"]})
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for d in doms:
        pts = [(c["round"], c["dev"][d]["pass_at_1"], c["dev"][d].get("stderr") or 0.0) for c in curve if d in c["dev"]]
        r, p, e = zip(*pts)
        ax.errorbar(r, [100 * x for x in p], yerr=[100 * x for x in e], label=d, marker="o", capsize=3)
    ax.set_xticks(sorted({c["round"] for c in curve}))
    ax.set_xlabel("distill round (0: the merge)")
    ax.set_ylabel("dev pass@1 x 100")
    ax.set_title("On-policy distillation from the branches")
    ax.legend()
    return _save(fig, path)
