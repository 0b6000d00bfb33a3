"""End to end: the default toy run (`jobs/run.py`, what the README's first command runs), timed per
stage from the run directory's manifests.

    .venv/bin/python benchmarks/bench_e2e.py [hydra overrides ...]

Runs in a fresh temporary run directory (removed afterwards; pass run_dir=... to keep it), then
prints one row per stage: wall seconds, share of the run, and the stage's main count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What says how much work a stage did: keys of its manifest's result, shown as key=value.
WORK = {"toy": ["rows"], "generate": ["rows", "completion_tokens_per_s"], "verify": ["rows", "kept"],
        "train": ["branches"], "merge": ["steps", "tensors_merged"], "evaluate": ["models", "samples"],
        "report": ["rows"]}


def _work(stage: str, result: dict) -> str:
    return ", ".join(f"{k}={result[k]}" for k in WORK.get(stage, []) if result.get(k) is not None)


def main() -> None:
    args = sys.argv[1:]
    keep = any(a.startswith("run_dir=") for a in args)
    tmp = None if keep else tempfile.mkdtemp(prefix="bench-e2e-")
    if tmp:
        args = [f"run_dir={tmp}/run", *args]
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run_dir=")))
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, str(ROOT / "jobs" / "run.py"), *args], cwd=ROOT)
        wall = time.time() - t0
        if p.returncode:
            sys.exit(f"jobs/run.py failed with exit code {p.returncode}")
        config = json.loads((run_dir / "config.json").read_text())
        rows = []
        for stage in config["stages"]:
            m = json.loads((run_dir / stage / "manifest.json").read_text())
            rows.append((stage, m["wall_time_s"], _work(stage, m.get("result", {}))))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(r[1] for r in rows)
    print(f"\nEnd to end, {' '.join(sys.argv[1:]) or 'default toy run'}: {wall:.0f} s wall "
          f"({total:.0f} s in stages, the rest Python, Hydra and Ray start-up), {os.cpu_count()} CPUs\n")
    print("| stage | wall s | share | work |")
    print("|---|---|---|---|")
    for stage, s, c in rows:
        print(f"| {stage} | {s:.1f} | {100 * s / wall:.0f}% | {c} |")


if __name__ == "__main__":
    main()
