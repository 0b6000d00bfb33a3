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


def loss_curves(run_dir: str | Path, doms: list[str]) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) per branch from train/<domain>/metrics.jsonl, else from the train
    manifest's result["per_branch"][<domain>]["loss_curve"] (a thinned curve)."""
    out: dict[str, list[tuple[float, float]]] = {}
    man = (_json(Path(run_dir) / "train" / "manifest.json") or {}).get("result") or {}
    for d in doms:
        path = Path(run_dir) / "train" / d / "metrics.jsonl"
        pts: list[tuple[float, float]] = []
        if path.exists():
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    r = json.loads(line)
                    if r.get("loss") is not None:
                        pts.append((float(r.get("step", i)), float(r["loss"])))
        else:
            src = (man.get("per_branch") or {}).get(d) or {}
            curve = src.get("loss_curve") or []
            pts = [(float(p[0]), float(p[1])) if isinstance(p, (list, tuple)) else (float(i), float(p))
                   for i, p in enumerate(curve)]
        out[d] = pts
    return out
