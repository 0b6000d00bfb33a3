"""One domain changes: what an update costs with Branch-Merge against retraining the mixture.

    .venv/bin/python benchmarks/bench_update.py --run-dir runs/toy [--domain science]

In a copy of a finished toy run, the domain's SFT set changes (its verified rows regenerated with
another seed stand in for a new set: here a seeded half of the rows is replaced by the other
half, duplicated, so the set's size and lengths stay comparable). Then, each through `jobs/run.py`
as a user runs it:
1. Branch-Merge's update: `stages=[train,merge]` without the mixture: the train stage reuses every
   unchanged branch and retrains that domain's alone, then the merge reruns;
2. the mixture's update: `stages=[train]` with the mixture on: every branch is reused, the mixture
   retrains on the changed union.
Prints both wall times (stage times from the manifests) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(run_dir: str, *overrides: str) -> float:
    t0 = time.time()
    p = subprocess.run([sys.executable, "jobs/run.py", f"run_dir={run_dir}", *overrides], cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"jobs/run.py {' '.join(overrides)} failed:\n{p.stderr[-3000:]}")
    return time.time() - t0


def _stage(run_dir: str, stage: str) -> dict:
    return json.load(open(os.path.join(run_dir, stage, "manifest.json")))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/toy", help="a finished toy run (train done)")
    p.add_argument("--domain", default="science")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_update_")
    dst = os.path.join(scratch, "run")
    try:
        shutil.copytree(os.path.abspath(a.run_dir), dst, symlinks=True)
        sft = os.path.join(dst, "verify", f"{a.domain}.jsonl")
        rows = [l for l in open(sft) if l.strip()]
        rng = random.Random(a.seed)
        rng.shuffle(rows)
        half = rows[: len(rows) // 2]
        open(sft, "w").writelines(half + half[: len(rows) - len(half)])
        bm = _run(dst, "stages=[train,merge]", "train.mixture_baseline=false")
        train = _stage(dst, "train")
        bm_stages = train["wall_time_s"] + _stage(dst, "merge")["wall_time_s"]
        mix = _run(dst, "stages=[train]", "train.mixture_baseline=true")
        train2 = _stage(dst, "train")
        print(f"domain changed: {a.domain} ({len(rows)} rows)")
        print(f"Branch-Merge update: retrained {train['result']['trained']}, reused {train['result']['reused']}; "
              f"train + merge stages {bm_stages:.0f} s (train {train['wall_time_s']:.0f} s, merge "
              f"{bm_stages - train['wall_time_s']:.0f} s; {bm:.0f} s with start-up)")
        print(f"mixture update: retrained {train2['result']['trained']}, reused {train2['result']['reused']}; "
              f"train stage {train2['wall_time_s']:.0f} s ({mix:.0f} s with start-up)")
        print(f"ratio (mixture / Branch-Merge, stage times): {train2['wall_time_s'] / bm_stages:.2f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
