"""The merge search's plan, independent of how candidates are merged and scored: the candidate
recipes drawn from the configured space, and successive halving over dev prompts.

Candidates: Arcee Fusion chains in every order of the branches (the reference recipe picked one
order by hand), linear and model_stock, the spectral merges (TSV-M, Iso-C, Iso-CTS) with their
papers' settings, RegMean and RegMean++ with equal coefficients, then seeded draws of task
arithmetic, TIES, DARE-TIES, the spectral merges and RegMean(++) with per-branch weights (for
RegMean a coefficient on each branch's Gram matrices), densities, a scaling lambda, Iso-CTS's
common-space share and RegMean's alpha from the configured values, up to the budget; with
`layer_groups` > 1 a branch's weight is a gradient over the layers (one value per layer group).
Successive halving: every candidate is scored on the first `first_prompts` dev prompts of each
domain; the best 1/eta go on to eta times as many prompts, and so on until the survivors have
seen the whole dev split; the best of the last rung is the search's choice. A candidate below
the student base on any domain (`floor=base`, on the same prompts) is never chosen.

Refinement (`refine_rounds`): when the choice is a weighted or spectral method, its neighbours,
each with one branch's weight one step up or down the configured values, are scored on the whole
dev split and the best of them and the choice is kept, round after round while a neighbour wins. Merging
dilutes each branch's task vector by the others' (task arithmetic adds them all to one base;
TIES and DARE-TIES divide by the weights' sum), and the domain that loses most of its gain needs
its branch's share raised, or the others' lowered: on the toy, science keeps 80% of its gain at
weight 0.85 each and about all of it with 0.7/0.7/1.3. Successive halving alone rarely finds such
a recipe: on its first rung, 10 prompts cannot tell recipes a few points apart.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from rdistill.config import MergeSearchConfig

WEIGHTED = ("task_arithmetic", "ties", "dare_ties")
SPECTRAL = ("tsv_m", "iso_c", "iso_cts")
"""Data-free spectral merges (merge/spectral.py): per-branch weights scale the task vectors."""
STATS_METHODS = ("regmean", "regmean_plusplus")
"""Merges fit to each branch's layer inputs (merge/regmean.py): a coefficient per branch."""


@dataclass
class Candidate:
    name: str
    label: str
    """What it is, in a few words: `task_arithmetic w=0.7/0.85/1.0`."""
    steps: list[dict]
    """Merge steps (MergeStepConfig fields) with run references (base, branch:<d>, merge:<step>)."""
    scores: dict = field(default_factory=dict)
    """prompts per domain -> {domain: dev pass@1} for each rung it reached."""
    out_at: Optional[int] = None
    """The rung it was eliminated at (None: it reached the last one)."""
    refined_from: Optional[str] = None
    """The candidate it is a neighbour of (refinement), else None."""


def _step(name: str, method: str, base: Optional[str], models: list[tuple[str, dict]], params: dict) -> dict:
    return {"name": name, "merge_method": method, "base_model": base,
            "models": [{"model": m, "parameters": p} for m, p in models], "parameters": params,
            "dtype": "float32", "out_dtype": "float32"}


def fusion_chain(order: list[str]) -> list[dict]:
    """Fusion of the 2nd branch onto the 1st, then of each next branch's model... onto the
    running result, as the reference: mid = fusion(base=science, other=math), final =
    fusion(base=code, other=mid) is the order (science, math, code)."""
    refs = [f"branch:{d}" for d in order]
    steps = [_step("mid1", "arcee_fusion", refs[0], [(refs[1], {})], {})]
    for i, ref in enumerate(refs[2:], start=2):
        steps.append(_step(f"mid{i}", "arcee_fusion", ref, [(f"merge:{steps[-1]['name']}", {})], {}))
    steps[-1]["name"] = "final"
    return steps


def candidate_space(domains: list[str], sc: MergeSearchConfig) -> list[Candidate]:
    """Up to `sc.candidates` distinct recipes, the same for the same config and seed."""
    out: list[Candidate] = []
    seen: set = set()

    def add(label: str, steps: list[dict]) -> None:
        if label not in seen and len(out) < sc.candidates:
            seen.add(label)
            out.append(Candidate(f"c{len(out):02d}", label, steps))
    branches = [f"branch:{d}" for d in domains]
    if "arcee_fusion" in sc.methods and len(domains) >= 2:
        for order in itertools.permutations(domains):
            add("arcee_fusion chain " + " <- ".join(order), fusion_chain(list(order)))
    if "linear" in sc.methods:
        add("linear (equal weights)", [_step("final", "linear", None, [(b, {"weight": 1.0}) for b in branches], {})])
    if "model_stock" in sc.methods and len(domains) >= 2:
        add("model_stock", [_step("final", "model_stock", "base", [(b, {}) for b in branches], {})])
    lam1 = 1.0 if 1.0 in sc.lambdas else sc.lambdas[0]
    common = 0.8 if 0.8 in sc.common_space_fractions else sc.common_space_fractions[0]
    for m in (m for m in SPECTRAL if m in sc.methods):  # the papers' settings: equal weights, lambda 1
        ws = [1.0] * len(domains)
        add(_label(m, ws, 0.5, lam1, common), _weighted(m, branches, ws, 0.5, lam1, common))
    for m in (m for m in STATS_METHODS if m in sc.methods):  # fusion-bench's defaults: equal, alpha first
        ws = [1.0] * len(domains)
        add(_label(m, ws, sc.ratios[0], 1.0), _weighted(m, branches, ws, sc.ratios[0], 1.0))
    weighted = [m for m in WEIGHTED if m in sc.methods]
    for w in sc.weights:  # the uniform settings first: the obvious baselines of each method
        for m in weighted:
            ws = [w] * len(domains)
            dens = 0.5 if 0.5 in sc.densities else sc.densities[0]
            lam = 1.0 if 1.0 in sc.lambdas else sc.lambdas[0]
            add(_label(m, ws, dens, lam), _weighted(m, branches, ws, dens, lam))
    weighted += [m for m in SPECTRAL + STATS_METHODS if m in sc.methods]
    rng = random.Random(sc.seed)
    tries = 0
    while len(out) < sc.candidates and weighted and tries < 100 * sc.candidates:
        tries += 1
        m = rng.choice(weighted)
        ws = [_one([rng.choice(sc.weights) for _ in range(sc.layer_groups)]) for _ in domains]
        if m in STATS_METHODS:  # the density slot carries RegMean's alpha
            dens, lam = rng.choice(sc.ratios), 1.0
        else:
            dens = rng.choice(sc.densities) if m in ("ties", "dare_ties") else 0.5
            lam = rng.choice(sc.lambdas) if m != "task_arithmetic" else 1.0
        frac = rng.choice(sc.common_space_fractions) if m == "iso_cts" else common
        add(_label(m, ws, dens, lam, frac), _weighted(m, branches, ws, dens, lam, frac))
    return out


Weight = Union[float, list]
"""A branch's weight: one number, or a gradient over the layer groups (`layer_groups`)."""


def _one(values: list[float]) -> Weight:
    """A gradient whose groups are all equal is that one number (the same recipe, one label)."""
    return values[0] if len(set(values)) == 1 else list(values)


def _groups(w: Weight) -> list[float]:
    return list(w) if isinstance(w, list) else [w]


def _label(method: str, ws: list[Weight], density: float, lam: float, common: float = 0.8) -> str:
    """The recipe in words, and the key that tells recipes apart: TIES, DARE-TIES and RegMean
    normalize by the weights' sum, so only their ratios matter (0.5/0.5/0.5 is 1/1/1); the spectral
    merges scale with their task vectors, so weights 0.5/0.5/0.5 at lambda 1 are 1/1/1 at lambda
    0.5. For RegMean `density` is its alpha. A gradient reads first>...>last layer group."""
    if method != "task_arithmetic":
        top = max(v for w in ws for v in _groups(w))
        ws = [_one([round(v / top, 3) for v in _groups(w)]) for w in ws]
        if method in SPECTRAL:
            lam = round(lam * top, 3)
    s = f"{method} w=" + "/".join(">".join(f"{v:g}" for v in _groups(w)) for w in ws)
    if method in SPECTRAL:
        return s + f" lambda={lam:g}" + (f" common={common:g}" if method == "iso_cts" else "")
    if method in STATS_METHODS:
        return s + f" alpha={density:g}"
    return s if method == "task_arithmetic" else s + f" density={density:g} lambda={lam:g}"


def _weighted(method: str, branches: list[str], ws: list[Weight], density: float, lam: float,
              common: float = 0.8) -> list[dict]:
    if method in STATS_METHODS:  # no base: the closed form on the branches (alpha in `density`)
        return [_step("final", method, None, [(b, {"weight": w}) for b, w in zip(branches, ws)],
                      {"reduce_non_diagonal_ratio": density})]
    if method == "task_arithmetic":
        return [_step("final", method, "base", [(b, {"weight": w}) for b, w in zip(branches, ws)], {})]
    if method in SPECTRAL:
        params = {"lambda": lam, **({"common_space_fraction": common} if method == "iso_cts" else {})}
        return [_step("final", method, "base", [(b, {"weight": w}) for b, w in zip(branches, ws)], params)]
    return [_step("final", method, "base", [(b, {"weight": w, "density": density}) for b, w in zip(branches, ws)],
                  {"lambda": lam, "normalize": True})]


def _weighted_recipe(c: Candidate) -> Optional[tuple[str, list[Weight], float, float, float]]:
    """(method, per-branch weights, density (RegMean: alpha), lambda, common-space share) of a
    one-step weighted, spectral or RegMean candidate, else None."""
    if len(c.steps) != 1 or c.steps[0]["merge_method"] not in WEIGHTED + SPECTRAL + STATS_METHODS:
        return None
    s = c.steps[0]
    ps = [m["parameters"] for m in s["models"]]
    if s["merge_method"] in STATS_METHODS:
        return s["merge_method"], [p["weight"] for p in ps], s["parameters"]["reduce_non_diagonal_ratio"], 1.0, 0.8
    return (s["merge_method"], [p["weight"] for p in ps], ps[0].get("density", 0.5),
            s["parameters"].get("lambda", 1.0), s["parameters"].get("common_space_fraction", 0.8))


def neighbours(c: Candidate, sc: MergeSearchConfig, start: int, seen: set[str]) -> list[Candidate]:
    """`c` with one branch's weight (for a gradient: one layer group's) one step up, then one step
    down, `sc.weights`, for each branch (where the grid has the step); named r<start>, r<start+1>,
    ...; recipes whose label is in `seen` are left out (and added)."""
    rec = _weighted_recipe(c)
    if rec is None:
        return []
    method, ws, dens, lam, common = rec
    grid = sorted(set(sc.weights))
    branches = [m["model"] for m in c.steps[0]["models"]]
    out = []
    for i, j, w in ((i, j, v) for i, w in enumerate(ws) for j, v in enumerate(_groups(w))):
        up, down = [g for g in grid if g > w + 1e-9], [g for g in grid if g < w - 1e-9]
        for step in ([up[0]] if up else []) + ([down[-1]] if down else []):
            new, vals = list(ws), _groups(ws[i])
            new[i] = _one(vals[:j] + [step] + vals[j + 1:])
            label = _label(method, new, dens, lam, common)
            if label in seen:
                continue
            seen.add(label)
            out.append(Candidate(f"r{start + len(out):02d}", label, _weighted(method, branches, new, dens, lam, common),
                                 refined_from=c.name))
    return out


def _rank(k: int, base: Optional[dict[str, float]], objective: Callable[[dict[str, float]], float]):
    """Sort key of candidates scored on k dev prompts: at or above the base's floor on every
    domain first, then by the objective."""
    def key(c: Candidate) -> tuple:
        s = c.scores[k]
        return (base is None or all(s[d] >= base[d] for d in s if d in base), objective(s))
    return key


def refine(chosen: Candidate, cands: list[Candidate], n_dev: int, sc: MergeSearchConfig,
           score: Callable[[list[Candidate], int], dict[str, dict[str, float]]],
           objective: Callable[[dict[str, float]], float],
           floor: Optional[Callable[[int], dict[str, float]]] = None) -> Candidate:
    """Rounds of per-branch weight refinement (module docstring) on the whole dev split; the
    neighbours are appended to `cands` (with their scores, and `out_at` = the round they lost
    in, counted after the halving's rungs). Returns the final choice."""
    seen = {c.label for c in cands}
    rung0 = max((c.out_at for c in cands if c.out_at is not None), default=-1) + 1
    for r in range(sc.refine_rounds):
        near = neighbours(chosen, sc, sum(c.refined_from is not None for c in cands), seen)
        if not near:
            break
        cands.extend(near)
        got = score([chosen, *near], n_dev)
        base = floor(n_dev) if floor else None
        for c in [chosen, *near]:
            c.scores[n_dev] = got[c.name]
        best = max([chosen, *near], key=_rank(n_dev, base, objective))  # the incumbent, first, wins a tie
        for c in [chosen, *near]:
            if c is not best:
                c.out_at = rung0 + r
        if best is chosen:
            break
        chosen = best
    return chosen


def rungs(n_candidates: int, n_dev: int, first: int, eta: int) -> list[tuple[int, int]]:
    """(dev prompts per domain, candidates scored) of each rung of successive halving."""
    out, k, n = [], min(first, n_dev), n_candidates
    while True:
        out.append((k, n))
        if k >= n_dev or n <= 1:
            return out
        k, n = min(n_dev, k * eta), max(1, math.ceil(n / eta))


def successive_halving(cands: list[Candidate], n_dev: int, sc: MergeSearchConfig,
                       score: Callable[[list[Candidate], int], dict[str, dict[str, float]]],
                       objective: Callable[[dict[str, float]], float],
                       floor: Optional[Callable[[int], dict[str, float]]] = None) -> Candidate:
    """Run the rungs; `score(cands, k)` gives {name: {domain: pass@1 on the first k dev prompts}}
    (cached by the caller, so a resumed search scores only what is new); `floor(k)` gives the
    base's scores on the same prompts. Returns the chosen candidate (every candidate's `scores`
    and `out_at` are filled in)."""
    alive = list(cands)
    plan = rungs(len(cands), n_dev, sc.first_prompts, sc.eta)
    for r, (k, _) in enumerate(plan):
        got = score(alive, k)
        base = floor(k) if floor else None
        for c in alive:
            c.scores[k] = got[c.name]
        ranked = sorted(alive, key=_rank(k, base, objective), reverse=True)  # stable: the earlier candidate wins a tie
        keep = plan[r + 1][1] if r + 1 < len(plan) else 1
        for c in ranked[keep:]:
            c.out_at = r
        alive = ranked[:keep]
    return alive[0]
