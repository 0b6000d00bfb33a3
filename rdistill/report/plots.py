"""The report's figures as PNG files (matplotlib's Agg backend: no display needed).

Each function takes plain data (so the notebook and tests can call them directly). A
`*_figure` function builds the matplotlib figure (tests look at its artists); its PNG writer
saves it and returns the path, or None when there is nothing to draw. Every plot draws a model
in the same colour and marker (`model_styles`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from rdistill.refs import MIXTURE  # noqa: E402
from rdistill.report.table import Table  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends and group names sit outside the axes
    plt.close(fig)
    return path


# Kinds of models, in table order, and the hues each kind draws from: related models share a
# hue family, and every model gets its own colour and marker within it, so two models are told
# apart by either (a printout in grey, a colour-blind reader) and the kinds read as groups.
KINDS = [("base", "base"), ("branch", "branches"), ("merge", "merges"), ("baseline", "baselines"),
         ("teacher", "teacher")]
_HUES = {
    "base": ["#595959"],
    "branch": ["#1f77b4", "#17becf", "#9467bd", "#393b79", "#6baed6", "#3182bd"],
    "merge": ["#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#a6761d", "#fb9a99", "#843c39", "#f16913"],
    "baseline": ["#2ca02c", "#98df8a", "#006d2c"],
    "teacher": ["#000000"],
}
_MARKERS = ["s", "o", "^", "v", "D", "P", "X", "h", "p", "<", ">", "d", "H", "8"]
_STAR = "*"  # kept for the chosen merge


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    kind: str
    highlight: bool
    """The chosen merge and the mixture baseline: drawn larger, their rows shaded, labels bold."""


def kind_of(model: str) -> str:
    kind = model.partition(":")[0]
    return kind if kind in ("base", "branch", "merge", "teacher") else "baseline"


def model_styles(models: Sequence[str], chosen: str | None = None) -> dict[str, Style]:
    """One colour and one marker per model (the same model looks the same in every plot): a
    colour of its kind's family (the chosen merge gets the merges' first, strongest one) and a
    marker no other model has, for up to 14 models (the chosen merge: a star)."""
    out: dict[str, Style] = {}
    used = {k: 0 for k in _HUES}
    used["merge"] = int(chosen is not None)  # the family's first, strongest colour is the chosen one's
    markers = iter(_MARKERS)
    for m in models:
        kind = kind_of(m)
        fam = _HUES[kind]
        if m == chosen:
            color = fam[0]
        else:
            color = fam[used[kind] % len(fam)]
            used[kind] += 1
        marker = _STAR if m == chosen else next(markers, _MARKERS[len(out) % len(_MARKERS)])
        out[m] = Style(color, marker, kind, highlight=m == chosen or m == MIXTURE)
    return out


def _grouped(models: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(kind heading, its models in the given order) for each kind present, in KINDS order."""
    return [(title, [m for m in models if kind_of(m) == kind]) for kind, title in KINDS
            if any(kind_of(m) == kind for m in models)]


def accuracy_figure(t: Table, chosen: str | None = None, styles: Mapping[str, Style] | None = None):
    """A dot plot per column (domains, mean): pass@1 (%) of every model with one standard error
    either side, the models in rows grouped by kind (base, branches, merges, baselines,
    teacher). One errorbar artist per model and panel, labelled with the model's name."""
    groups = _grouped(t.rows)
    styles = styles or model_styles(t.rows, chosen)
    y, pos, ticks = 0.0, {}, []
    for _, members in groups:
        for m in members:
            pos[m] = y
            y += 1
        y += 0.6  # a gap between kinds
    cols = t.columns
    fig, axes = plt.subplots(1, len(cols), sharey=True, squeeze=False,
                             figsize=(2.2 * len(cols) + 2.6, 0.32 * y + 1.6))
    for ax, c in zip(axes[0], cols):
        for m in t.rows:
            st = styles[m]
            v = t.value(m, c)
            if st.highlight:
                ax.axhspan(pos[m] - 0.45, pos[m] + 0.45, color="#fff2b3", zorder=0)
            if v is None:
                continue
            ax.errorbar([100 * v], [pos[m]], xerr=[100 * t.errors.get((m, c), 0.0)], fmt=st.marker,
                        color=st.color, ms=11 if st.highlight else 7, mec="black" if st.highlight else st.color,
                        mew=1.2 if st.highlight else 0.5, capsize=3, elinewidth=1.2, zorder=3,
                        label=t.labels.get(m, m), gid=m)
        for (_, members), nxt in zip(groups, groups[1:]):
            ax.axhline((pos[members[-1]] + pos[nxt[1][0]]) / 2, color="#cccccc", lw=0.8, zorder=1)
        ax.set_title(c, fontweight="bold" if c == "mean" else None)
        ax.set_xlabel("pass@1 (%)")
        ax.grid(axis="x", color="#eeeeee", zorder=0)
        lo = min([100 * (t.value(m, c) - t.errors.get((m, c), 0.0)) for m in t.rows if t.value(m, c) is not None],
                 default=0.0)
        ax.set_xlim(max(0.0, lo - 8), 105)  # room for a marker at 100
        ax.set_xticks([x for x in range(0, 101, 20) if x >= max(0.0, lo - 8)])
    ax0 = axes[0][0]
    ax0.set_yticks([pos[m] for m in t.rows], [t.labels.get(m, m) for m in t.rows], fontsize=9)
    for lab, m in zip(ax0.get_yticklabels(), t.rows):
        lab.set_color(styles[m].color)
        if styles[m].highlight:
            lab.set_fontweight("bold")
    ax0.set_ylim(y - 0.6 + 0.2, -0.8)  # first row at the top
    for title, members in groups:  # the kind's name beside its rows, right of the last panel
        axes[0][-1].text(1.03, (pos[members[0]] + pos[members[-1]]) / 2, title, transform=blended(axes[0][-1]),
                         va="center", ha="left", fontsize=9, style="italic", color="#444444")
    fig.suptitle("pass@1 per domain on the test split (± one standard error); shaded: "
                 + ("the chosen merge and the mixture baseline" if chosen else "the mixture baseline"),
                 fontsize=10)
    return fig


def blended(ax):
    """x in axes fraction, y in data: text beside a row, outside the panel."""
    from matplotlib.transforms import blended_transform_factory
    return blended_transform_factory(ax.transAxes, ax.transData)


def accuracy_dots(t: Table, path: Path, chosen: str | None = None,
                  styles: Mapping[str, Style] | None = None) -> Path | None:
    """`accuracy_figure` as a PNG."""
    return _save(accuracy_figure(t, chosen, styles), path) if t.rows else None


def _piles(xy: Sequence[tuple[float, float]], close: float = 0.025) -> list[tuple[int, int]]:
    """For points in axes-fraction units: (the first point of the pile each one is on, its place
    in that pile), a pile being points within `close` of its first one both ways."""
    out: list[tuple[int, int]] = []
    for i, (x, y) in enumerate(xy):
        root = next((j for j, (a, b) in enumerate(xy[:i]) if out[j][1] == 0 and abs(x - a) < close
                     and abs(y - b) < close), i)
        out.append((root, sum(r == root for r, _ in out) if root != i else 0))
    return out


def cost_figure(t: Table, compute: Mapping[str, float], chosen: str | None = None,
                styles: Mapping[str, Style] | None = None):
    """Mean pass@1 (%) against the compute it took to make each model from the student base,
    one point (an errorbar artist labelled with the model) per model with its standard error;
    a model without a recorded cost (the teacher) is a dashed line across. Points that would
    cover each other are drawn side by side (2% of the axis apart), their names stacked."""
    styles = styles or model_styles(t.rows, chosen)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = [m for m in t.rows if m in compute and t.value(m, "mean") is not None]
    xs, ys = [compute[m] for m in pts], [100 * t.value(m, "mean") for m in pts]
    sx, sy = (max(xs, default=0) - min(xs, default=0)) or 1.0, (max(ys, default=0) - min(ys, default=0)) or 1.0
    piles = dict(zip(pts, _piles([((x - min(xs)) / sx, (y - min(ys)) / sy) for x, y in zip(xs, ys)])))
    size = {r: sum(root == r for root, _ in piles.values()) for r, _ in piles.values()}
    for m in t.rows:
        v, st = t.value(m, "mean"), styles[m]
        if v is None:
            continue
        label = t.labels.get(m, m)
        if m not in compute:
            ax.axhline(100 * v, color=st.color, ls="--", lw=1, label=f"{label}: no compute recorded", gid=m)
            continue
        root, k = piles[m]
        x = compute[m] + 0.02 * sx * k  # the k-th point of a pile, a marker's width aside
        ax.errorbar([x], [100 * v], yerr=[100 * t.errors.get((m, "mean"), 0.0)], fmt=st.marker,
                    color=st.color, ms=12 if st.highlight else 8, mec="black" if st.highlight else st.color,
                    mew=1.2 if st.highlight else 0.5, capsize=3, zorder=3, label=label, gid=m)
        ax.annotate(m, (compute[m] + 0.02 * sx * (size[root] - 1), 100 * v), textcoords="offset points",
                    xytext=(8, -3 - 9 * k),
                    fontsize=7, color=st.color, fontweight="bold" if st.highlight else None)
    ax.set_xlabel("compute to make the model from the student base (s: training, plus merging)")
    ax.set_ylabel("mean pass@1 over domains (%)")
    ax.set_title("Cost against accuracy (± one standard error)")
    ax.grid(color="#eeeeee")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def cost_accuracy(t: Table, compute: Mapping[str, float], path: Path, chosen: str | None = None,
                  styles: Mapping[str, Style] | None = None) -> Path | None:
    """`cost_figure` as a PNG (None when no trained or merged model's cost is recorded)."""
    if not any(m in compute and m != "base" and t.value(m, "mean") is not None for m in t.rows):
        return None
    return _save(cost_figure(t, compute, chosen, styles), path)


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


def smooth(ys: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points (fewer at the ends): the trend without the
    per-step noise of a small batch."""
    import numpy as np
    y = np.asarray(ys, dtype=float)
    if window <= 1 or len(y) < 3:
        return y.tolist()
    k = np.ones(window)
    num = np.convolve(y, k, mode="same")
    den = np.convolve(np.ones_like(y), k, mode="same")
    return (num / den).tolist()


def loss_figure(curves: Mapping[str, Sequence[tuple[float, float]]], styles: Mapping[str, Style] | None = None):
    """Training loss against optimizer step for every trained model (branches, the mixture):
    each raw (faint) and smoothed (solid, in the model's colour), the legend naming the
    smoothed lines."""
    curves = {m: c for m, c in curves.items() if len(c)}
    styles = styles or model_styles(list(curves))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for m, c in curves.items():
        steps, losses = zip(*c)
        st = styles[m]
        ax.plot(steps, losses, color=st.color, alpha=0.25, lw=0.8, gid=f"{m} raw")
        # a window of 1/15 of the curve: a 150-step branch and the 450-step mixture look alike
        ax.plot(steps, smooth(losses, len(c) // 15), color=st.color, lw=2 if st.highlight else 1.6,
                label=m, gid=f"{m} smoothed", marker=st.marker, markevery=max(1, len(c) // 8), ms=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Training loss: raw (faint) and smoothed")
    ax.grid(color="#eeeeee", which="both")
    ax.legend(fontsize=8)
    return fig


def loss_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path,
                styles: Mapping[str, Style] | None = None) -> Path | None:
    """`loss_figure` as a PNG (curves keyed by model: branch:<domain>, mixture)."""
    if not any(len(c) for c in curves.values()):
        return None
    return _save(loss_figure(curves, styles), path)


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
