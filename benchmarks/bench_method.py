"""Does the method hold across seeds? Reruns train -> merge -> evaluate -> report of a finished toy
run on several seeds (branch data order and initialisation, the merge search's draws, the
evaluation's sampling) and prints each seed's table, the method's claims, and the mean over seeds.

    .venv/bin/python benchmarks/bench_method.py --run-dir runs/toy [--seeds 1 2 3] [--out FILE]

The teacher's SFT sets (toy, generate, verify) are shared: they are the data, not the method.
Each seed runs in a copy of the run directory, through `jobs/run.py` as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("toy", "generate", "verify", "config.json")


def one(run_dir: str, seed: int, scratch: str) -> dict:
    dst = os.path.join(scratch, f"seed{seed}")
    os.makedirs(dst)
    for name in SHARED:
        src = os.path.join(run_dir, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(dst, name))
    t0 = time.time()
    p = subprocess.run([sys.executable, "jobs/run.py", f"run_dir={dst}", "stages=[train,merge,evaluate,report]",
                        f"seed={seed}", f"train.seed={seed}", f"merge.search.seed={seed}",
                        f"eval.sampling.seed={seed}"], cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{p.stderr[-3000:]}")
    report = json.load(open(os.path.join(dst, "report", "manifest.json")))["result"]
    results = json.load(open(os.path.join(dst, "evaluate", "results.json")))
    return {"seed": seed, "wall_s": round(time.time() - t0, 1), "table": report["table"],
            "method": report["method"],
            "pass_at_1": {f"{r['model']}/{r['domain']}": r["pass_at_1"] for r in results}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/toy", help="a finished toy run (toy, generate and verify done)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out")
    a = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_method_")
    runs = []
    try:
        for s in a.seeds:
            runs.append(one(os.path.abspath(a.run_dir), s, scratch))
            r = runs[-1]
            print(f"\n== seed {s} ({r['wall_s']:.0f} s)\n{r['table']}")
            for c in r["method"]["claims"]:
                print(f"  {'held' if c['held'] else 'DID NOT HOLD'}: {c['claim']} ({c['evidence']})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    keys = sorted(runs[0]["pass_at_1"])
    mean = {k: statistics.mean(r["pass_at_1"][k] for r in runs) for k in keys}
    sd = {k: statistics.stdev(r["pass_at_1"][k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    models = sorted({k.rsplit("/", 1)[0] for k in keys})
    doms = sorted({k.rsplit("/", 1)[1] for k in keys})
    print(f"\n== mean over seeds {a.seeds} (pass@1 x 100, ± standard deviation over seeds)")
    print("model".ljust(24) + "".join(d.rjust(16) for d in doms))
    for m in models:
        print(m.ljust(24) + "".join(f"{100 * mean[f'{m}/{d}']:9.1f} ± {100 * sd[f'{m}/{d}']:4.1f}" for d in doms))
    held = [all(c["held"] for c in r["method"]["claims"]) for r in runs]
    chosen = [r["method"]["merged"] for r in runs]
    print(f"method held on {sum(held)} of {len(runs)} seeds; chosen merges: {', '.join(chosen)}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"runs": runs, "mean": mean, "sd": sd, "held": held}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
