"""What each model cost and what it trained on, in the shape of the paper's Table 2 (mixture vs
merge), and what a change of one domain costs each way.

Read from the manifests alone: the train stage records per model its tokens per domain, wall time
and worker-seconds (wall time x the CPUs or GPUs its workers hold); the merge stage its wall time
and the search's share of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rdistill.refs import MIXTURE


def _manifest(run_dir: str | Path, stage: str) -> dict:
    p = Path(run_dir) / stage / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def trained(run_dir: str | Path) -> dict[str, dict]:
    """{model ref: {tokens_per_domain, wall_s, worker_s, compute_unit, reused}} of every trained model."""
    per = (_manifest(run_dir, "train").get("result") or {}).get("per_branch") or {}
    return {(d if d == MIXTURE else f"branch:{d}"): r for d, r in per.items()}


def cost_summary(run_dir: str | Path) -> dict:
    """Compute per side (Branch-Merge, mixture) and per update of one domain."""
    models = trained(run_dir)
    branches = {m: r for m, r in models.items() if m != MIXTURE}
    merge = _manifest(run_dir, "merge")
    sp = Path(run_dir) / "merge" / "search.json"
    search = json.loads(sp.read_text()) if sp.exists() else {}
    unit = next((r.get("compute_unit") for r in models.values() if r.get("compute_unit")), "CPU-s")
    out = {"unit": unit,
           "branches_worker_s": round(sum(r.get("worker_s", 0) for r in branches.values()), 1),
           "branches_wall_s": {m: r.get("wall_s") for m, r in branches.items()},
           "mixture_worker_s": models.get(MIXTURE, {}).get("worker_s"),
           "mixture_wall_s": models.get(MIXTURE, {}).get("wall_s"),
           "merge_wall_s": merge.get("wall_time_s"),
           "search_s": search.get("seconds")}
    if branches:
        costs = [r.get("worker_s", 0) for r in branches.values()]
        out["one_branch_worker_s"] = {"mean": round(sum(costs) / len(costs), 1), "max": max(costs)}
    return out


def cost_markdown(run_dir: str | Path, domains: list[str]) -> str:
    models = trained(run_dir)
    if not models:
        return "(no train stage in this run)"
    s = cost_summary(run_dir)
    unit = s["unit"]
    lines = [f"Tokens each model trained on per domain (prompt + answer, every pass counted), its wall time and "
             f"its compute ({unit}: wall time x the {unit[:3]}s its workers hold).", "",
             "| model | " + " | ".join(f"tokens {d}" for d in domains) + f" | wall s | {unit} |",
             "|---|" + "---:|" * (len(domains) + 2)]
    for m, r in models.items():
        tok = r.get("tokens_per_domain") or {}
        reused = " (reused)" if r.get("reused") else ""
        lines.append(f"| {m}{reused} | " + " | ".join(f"{tok[d]:,}" if d in tok else "-" for d in domains)
                     + f" | {r.get('wall_s', 0):.0f} | {r.get('worker_s', 0):,.0f} |")
    lines += ["", "| side | cost |", "|---|---|",
              f"| branches | {s['branches_worker_s']:,.0f} {unit} in all; wall "
              + ", ".join(f"{m.split(':', 1)[-1]} {w:.0f} s" for m, w in s["branches_wall_s"].items() if w is not None)
              + " (side by side where the cores hold them, else one after another: train.concurrent) |"]
    if s.get("merge_wall_s") is not None:
        search = f", of which the search {s['search_s']:.0f} s" if s.get("search_s") else ""
        lines.append(f"| merge stage | {s['merge_wall_s']:.0f} s wall{search} |")
    if s.get("mixture_worker_s") is not None:
        lines.append(f"| mixture | {s['mixture_worker_s']:,.0f} {unit}, {s['mixture_wall_s']:.0f} s wall |")
    if s.get("one_branch_worker_s") and s.get("mixture_worker_s") is not None:
        one = s["one_branch_worker_s"]
        lines += ["", f"**One domain changes.** Branch-Merge retrains that domain's branch only (the train "
                      f"stage reuses every branch whose set and settings did not change): {one['mean']:,.0f} "
                      f"{unit} on average here (the largest {one['max']:,.0f}), then the merge"
                      + (f" ({s['merge_wall_s']:.0f} s)" if s.get("merge_wall_s") is not None else "")
                      + f"; the mixture retrains on everything: {s['mixture_worker_s']:,.0f} {unit}."]
    return "\n".join(lines)
