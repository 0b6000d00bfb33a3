"""A finished toy run directory as the report reads it, with the numbers of a real one: the
fresh-clone run of 2026-11-30 (benchmarks/README.md: 11 models, n = 2 samples on 200 test
prompts per domain, the search's merge chosen on dev), noisy per-step losses for the three
branches (150 steps) and the mixture (450), and the train and merge manifests' timings."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

DOMS = ["code", "math", "science"]
TABLE = {  # pass@1 x 100, code / math / science
    "base": (59.5, 62.0, 56.0),
    "branch:code": (100.0, 68.0, 56.5),
    "branch:math": (61.5, 100.0, 56.5),
    "branch:science": (59.0, 62.5, 90.0),
    "mixture": (100.0, 100.0, 95.0),
    "merge:fusion": (100.0, 78.0, 64.0),
    "merge:task_arithmetic": (98.5, 99.5, 79.0),
    "merge:ties": (90.5, 100.0, 75.0),
    "merge:dare_ties": (99.0, 100.0, 78.0),
    "merge:search": (97.5, 97.0, 87.0),
    "teacher": (100.0, 100.0, 98.5),
}
TRAIN_S = {"code": 61.2, "math": 58.4, "science": 63.0, "mixture": 180.5}  # training time, 2 workers each
MERGE_S = {"fusion": (1.9, 2.1), "task_arithmetic": (1.4,), "ties": (2.2,), "dare_ties": (2.0,)}
SEARCH_S = 139.0


def results() -> list[dict]:
    out = []
    for m, vals in TABLE.items():
        for d, v in zip(DOMS, vals):
            p = v / 100
            out.append({"model": m, "domain": d, "n_prompts": 200, "n_samples": 2, "pass_at_1": p,
                        "stderr": round(math.sqrt(p * (1 - p) / 200), 4), "n_errors": 0, "n_infra": 0})
    return out


def _losses(steps: int, start: float, end: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"step": s, "loss": max(0.01, (end + (start - end) * math.exp(-s / (steps / 6)))
                                    * (1 + rng.gauss(0, 0.25)))} for s in range(1, steps + 1)]


def write(root: Path) -> Path:
    def dump(rel: str, obj) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj))
    dump("config.json", {"domains": {d: {} for d in DOMS}, "teacher": {"name": "toy-teacher"},
                         "student": {"name": "toy-base"}})
    dump("evaluate/results.json", results())
    dump("evaluate/selection.json", {
        "candidate": "search", "path": "merge/search/final", "objective": "mean",
        "scores": {n: {"domains": {d: TABLE[f"merge:{n}"][i] / 100 - 0.01 for i, d in enumerate(DOMS)},
                       "objective": sum(TABLE[f"merge:{n}"]) / 300 - 0.01}
                   for n in ("fusion", "task_arithmetic", "ties", "dare_ties", "search")}})
    per = {}
    for i, (name, t) in enumerate(TRAIN_S.items()):
        n = 450 if name == "mixture" else 150
        rows = _losses(n, 1.2, 0.08, seed=i)
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        (root / "train" / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        per[name] = {"steps": n, "workers": 2, "train_time_s": t, "wall_s": t + 12.0,
                     "final_loss": rows[-1]["loss"], "loss_curve": [[r["step"], r["loss"]] for r in rows[::10]]}
    dump("train/manifest.json", {"stage": "train", "wall_time_s": 262.0, "result": {"per_branch": per}})
    dump("merge/manifest.json", {"stage": "merge", "wall_time_s": 146.4, "result": {
        "candidates": {c: {f"s{i}": {"seconds": s, "tensors": 40, "bytes_written": 4_000_000}
                           for i, s in enumerate(secs)} for c, secs in MERGE_S.items()},
        "search": {"chosen": "c07", "label": "task_arithmetic w=0.5/0.5/1", "engine_starts": 2,
                   "seconds": SEARCH_S}}})
    dump("verify/manifest.json", {"result": {"funnel": {
        d: [["generated", 1500], ["complete", 1497], ["formatted", 1495], ["correct", 1484], ["kept", 1484]]
        for d in DOMS}}})
    for d in DOMS:
        rows = [{"messages": [], "completion_tokens": 30 + k % 40} for k in range(100)]
        (root / "verify" / f"{d}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root
