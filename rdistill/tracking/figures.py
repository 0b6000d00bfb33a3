"""What a finished stage puts in its tracking run: the figures it already computed (its manifest's
result, and for some stages a file it wrote), and which of its files are artifacts.

Nothing here talks to a tracker: `stage_figures` only reads the stage folder, so it is tested
without a server and shared by the MLflow and W&B backends.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdistill.rundir import MANIFEST

_BAD_KEY = re.compile(r"[^\w.\- :/]")  # MLflow's allowed metric/param name characters


def key(name: str) -> str:
    return _BAD_KEY.sub("_", str(name))[:250]


def numbers(obj: Any, prefix: str = "", depth: int = 4) -> dict[str, float]:
    """Numeric leaves of nested dicts as {"a/b/c": value}; lists, strings and booleans are not
    figures (curves and funnels are logged step by step by their own code)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict) and depth > 0:
        for k, v in obj.items():
            out.update(numbers(v, f"{prefix}{k}/", depth - 1))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj) and prefix:
        out[key(prefix.rstrip("/"))] = float(obj)
    return out


def flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """A config slice as {"train.lr": "1e-05", ...}: scalars as text, lists as JSON (MLflow
    params are flat strings; W&B takes the nested dict itself)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            out.update(flat_params(v, f"{prefix}{k}."))
    elif prefix:
        text = obj if isinstance(obj, str) else json.dumps(obj, default=str, sort_keys=True)
        out[key(prefix.rstrip("."))] = text[:6000]
    return out


@dataclass
class Child:
    """A nested run under a stage run (a merge-search candidate), logged when the stage ends."""
    name: str
    params: dict
    scalars: dict[str, float] = field(default_factory=dict)
    steps: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class Figures:
    scalars: dict[str, float] = field(default_factory=dict)
    steps: dict[int, dict[str, float]] = field(default_factory=dict)
    """Stepped figures: {step: {metric: value}}, logged in step order (W&B needs it increasing)."""
    children: list[Child] = field(default_factory=list)
    parent: dict[str, float] = field(default_factory=dict)
    """Figures also shown on the parent run (the pass@1 table)."""
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    """(file or folder, destination folder in the run's artifacts; a folder's contents go to it)."""
    parent_artifacts: list[tuple[Path, str | None]] = field(default_factory=list)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_figures(stage: str, manifest: dict, stage_dir: Path, log_models: bool = False) -> Figures:
    result = manifest.get("result") or {}
    f = Figures(scalars=numbers(result))
    if isinstance(manifest.get("wall_time_s"), (int, float)):
        f.scalars["wall_time_s"] = float(manifest["wall_time_s"])
    if (stage_dir / MANIFEST).exists():
        f.artifacts.append((stage_dir / MANIFEST, None))
        f.parent_artifacts.append((stage_dir / MANIFEST, f"manifests/{stage}"))
    extra = {"verify": _verify, "train": _train, "merge": _merge, "evaluate": _evaluate, "report": _report}
    if stage in extra:
        extra[stage](f, result, stage_dir, log_models)
    return f


def _verify(f: Figures, result: dict, stage_dir: Path, log_models: bool) -> None:
    # result["funnel"] = {domain: [[step, count], ...]}, in pipeline order
    for dom, steps in (result.get("funnel") or {}).items():
        for i, (name, n) in enumerate(steps):
            f.scalars[key(f"funnel/{dom}/{name}")] = float(n)
            f.steps.setdefault(i, {})[key(f"funnel_curve/{dom}")] = float(n)
        counts = dict(steps)
        if counts.get("generated"):
            f.scalars[key(f"funnel/{dom}/kept_share")] = counts.get("kept", 0) / counts["generated"]


def _train(f: Figures, result: dict, stage_dir: Path, log_models: bool) -> None:
    # the loss curves went to the branch runs live (rdistill.tracking.tailer); weights on request
    if log_models:
        for dom in sorted((result.get("models") or {})):
            if (stage_dir / dom).is_dir():
                f.artifacts.append((stage_dir / dom, f"models/{dom}"))


def _merge(f: Figures, result: dict, stage_dir: Path, log_models: bool) -> None:
    for name in ("search.json", "selection.json"):
        if (stage_dir / name).exists():
            f.artifacts.append((stage_dir / name, None))
    search = _read(stage_dir / "search.json")
    for c in (search or {}).get("candidates", []):
        ch = Child(name=f"search/{c['name']}",
                   params={"label": c.get("label"), "steps": c.get("steps"), "out_at_rung": c.get("out_at_rung"),
                           "chosen": c["name"] == search.get("chosen")})
        for k, scores in sorted((c.get("dev") or {}).items(), key=lambda kv: int(kv[0])):
            # step = dev prompts per domain of the rung: the candidate's score as the search narrows
            row = {key(f"dev/{d}"): float(v) for d, v in (scores or {}).items() if isinstance(v, (int, float))}
            if k in (c.get("objective") or {}):
                row["objective"] = float(c["objective"][k])
            ch.steps[int(k)] = row
        if ch.steps:
            ch.scalars = {f"final_{k}": v for k, v in ch.steps[max(ch.steps)].items()}
        f.children.append(ch)


def _evaluate(f: Figures, result: dict, stage_dir: Path, log_models: bool) -> None:
    res = _read(stage_dir / "results.json") or []
    table: dict[str, float] = {}
    for r in res:
        m, d = r.get("model"), r.get("domain")
        if m is None or d is None or not isinstance(r.get("pass_at_1"), (int, float)):
            continue
        table[key(f"pass_at_1/{m}/{d}")] = float(r["pass_at_1"])
        if isinstance(r.get("stderr"), (int, float)):
            table[key(f"pass_at_1_stderr/{m}/{d}")] = float(r["stderr"])
        if isinstance(r.get("n_samples"), (int, float)):
            table[key(f"n_samples/{m}/{d}")] = float(r["n_samples"])
    f.scalars.update(table)
    f.parent.update(table)
    for name in ("results.json", "selection.json"):
        if (stage_dir / name).exists():
            f.artifacts.append((stage_dir / name, None))
    sel = _read(stage_dir / "selection.json") or {}
    model = stage_dir.parent / sel["path"] if sel.get("path") else None
    if log_models and model is not None and model.is_dir():  # the merge chosen on dev
        f.artifacts.append((model.resolve(), f"models/merge-{sel.get('candidate')}"))


def _report(f: Figures, result: dict, stage_dir: Path, log_models: bool) -> None:
    files = [p for p in sorted(stage_dir.iterdir()) if p.suffix in (".md", ".png")]
    f.artifacts += [(p, "report") for p in files]
    f.parent_artifacts += [(p, "report") for p in files]
