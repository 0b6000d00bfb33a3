"""Readers of a finished run directory: what the report (and notebooks/analyze_run.ipynb) show.

Every reader takes the run directory and returns plain data; a missing optional artifact gives
an empty result, so a report of a partial run still shows what there is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def results(run_dir: str | Path) -> list[dict]:
    """evaluate/results.json: [{model, domain, n_prompts, n_samples, pass_at_1, stderr}]."""
    path = Path(run_dir) / "evaluate" / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the evaluate stage first (stages=[evaluate,report])")
    return json.loads(path.read_text())


def selection(run_dir: str | Path) -> dict | None:
    """The run's chosen merge (rdistill.refs.merge_selection: the one owner of that choice)."""
    from rdistill.refs import merge_selection
    from rdistill.rundir import RunDir
    return merge_selection(RunDir(run_dir))


def search(run_dir: str | Path) -> dict | None:
    """merge/search.json: the merge search's candidates and their dev scores (None: no search)."""
    return _json(Path(run_dir) / "merge" / "search.json")


def domains(run_dir: str | Path) -> list[str]:
    """Domains in config order (config.json), else in the order results list them."""
    cfg = _json(Path(run_dir) / "config.json") or {}
    if cfg.get("domains"):
        return list(cfg["domains"])
    return list(dict.fromkeys(r["domain"] for r in results(run_dir)))


def _steps(obj: Any, prefix: str = "") -> list[tuple[str, int]]:
    """Flatten a funnel ({step: count}, [[step, count]], [{step/name, count/n/kept}], nested
    dicts) into ordered (label, count) pairs."""
    out: list[tuple[str, int]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((prefix + str(k), int(v)))
            elif isinstance(v, (dict, list)):
                out += _steps(v, f"{prefix}{k}/")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((prefix + str(item[0]), int(item[1])))
            elif isinstance(item, dict):
                name = next((item[k] for k in ("step", "name", "stage", "filter", "reason") if k in item), None)
                num = next((item[k] for k in ("count", "n", "kept", "remaining", "rows") if k in item), None)
                if name is not None and isinstance(num, (int, float)):
                    out.append((prefix + str(name), int(num)))
    return out


def funnels(run_dir: str | Path) -> dict[str, list[tuple[str, int]]]:
    """verify/manifest.json result["funnel"], per domain, as ordered (step, count) pairs."""
    m = _json(Path(run_dir) / "verify" / "manifest.json") or {}
    f = (m.get("result") or {}).get("funnel") or {}
    return {d: _steps(v) for d, v in f.items()}


def _kept(row: dict) -> bool:
    if row.get("kept") is False:
        return False
    return not (row.get("drop_reason") or row.get("dropped"))


def sft_lengths(run_dir: str | Path, doms: list[str]) -> dict[str, list[int]]:
    """Completion lengths (tokens) of the kept SFT samples in verify/<domain>.jsonl."""
    out: dict[str, list[int]] = {}
    for d in doms:
        path = Path(run_dir) / "verify" / f"{d}.jsonl"
        if not path.exists():
            continue
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out[d] = [int(r["completion_tokens"]) for r in rows
                  if _kept(r) and r.get("completion_tokens") is not None]
    return out


def _curve(path: Path) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            r = json.loads(line)
            if r.get("loss") is not None:
                pts.append((float(r.get("step", i)), float(r["loss"])))
    return pts


def loss_curves(run_dir: str | Path, doms: list[str]) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) of every trained model, keyed by model reference (`branch:<domain>`, then
    `mixture` when the run trained it): train/<name>/metrics.jsonl (every optimizer step), else
    the train manifest's result["per_branch"][<name>]["loss_curve"] (a thinned curve)."""
    from rdistill.refs import MIXTURE
    out: dict[str, list[tuple[float, float]]] = {}
    per = ((_json(Path(run_dir) / "train" / "manifest.json") or {}).get("result") or {}).get("per_branch") or {}
    for name, ref in [(d, f"branch:{d}") for d in doms] + [(MIXTURE, MIXTURE)]:
        path = Path(run_dir) / "train" / name / "metrics.jsonl"
        if path.exists():
            out[ref] = _curve(path)
        elif name in per or name != MIXTURE:  # no mixture in this run: no entry at all
            curve = (per.get(name) or {}).get("loss_curve") or []
            out[ref] = [(float(p[0]), float(p[1])) if isinstance(p, (list, tuple)) else (float(i), float(p))
                        for i, p in enumerate(curve)]
    return out


def compute_s(rec: dict) -> float | None:
    """Compute one manifest record says it spent, in seconds: its `compute_s` (worker-seconds)
    when the stage records it; else, for a trained model, its training time times its workers;
    else its wall seconds (a merge step, the merge search). None when it says nothing."""
    for k in ("compute_s", "worker_s"):  # worker_s: the train stage's wall time x workers' CPUs/GPUs
        if isinstance(rec.get(k), (int, float)):
            return float(rec[k])
    if isinstance(rec.get("train_time_s"), (int, float)):
        return float(rec["train_time_s"]) * int(rec.get("workers") or 1)
    for k in ("wall_s", "seconds"):
        if isinstance(rec.get(k), (int, float)):
            return float(rec[k])
    return None


def model_compute(run_dir: str | Path, models: list[str]) -> dict[str, float]:
    """Compute spent to make each model from the student base (seconds, see `compute_s`): 0 for
    the base; a branch's or the mixture's training; a merge's, its branches' training plus its
    own merge steps (the search: its merges and dev scoring). Models the manifests say nothing
    about (the teacher) are left out."""
    from rdistill.refs import MIXTURE
    root = Path(run_dir)
    train = ((_json(root / "train" / "manifest.json") or {}).get("result") or {}).get("per_branch") or {}
    merge = (_json(root / "merge" / "manifest.json") or {}).get("result") or {}
    trained = {name: compute_s(rec) for name, rec in train.items() if isinstance(rec, dict)}
    branches = [v for name, v in trained.items() if name != MIXTURE]
    all_branches = sum(branches) if branches and None not in branches else None
    out: dict[str, float] = {}
    for m in models:
        kind, _, name = m.partition(":")
        got: float | None = None
        if m == "base":
            got = 0.0
        elif kind == "branch" or m == MIXTURE:
            got = trained.get(name or m)
        elif kind == "merge" and all_branches is not None:
            steps = (merge.get("candidates") or {}).get(name)
            own = [compute_s(s) for s in steps.values()] if steps else \
                [compute_s(merge["search"])] if name == "search" and isinstance(merge.get("search"), dict) else [None]
            got = None if None in own else all_branches + sum(own)
        if got is not None:
            out[m] = got
    return out
