"""The evaluate stage with warm engines against one engine per model, side by side on a copy of a
finished toy run (same models, prompts, seeds): wall time, engine starts, and that both give the
same pass@1.

    .venv/bin/python benchmarks/bench_evaluate.py --run-dir runs/toy [--repeats 1] [--out FILE]

Runs alternate (warm, cold, warm, cold, ...) so that both meet the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))


def one(run_dir: str, warm: bool) -> dict:
    from rdistill.cli.compose import load
    from rdistill import pipeline
    from rdistill.rundir import RunDir
    cfg = load([f"run_dir={run_dir}", f"eval.warm_engines={str(warm).lower()}"])
    t0 = time.time()
    res = pipeline.run_stage(cfg, RunDir(run_dir), "evaluate")["result"]
    return {"warm": warm, "wall_s": round(time.time() - t0, 1), "models": res["models"],
            "engine_starts": res["engine_starts"], "samples": res["samples"], "pass_at_1": res["pass_at_1"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/toy", help="a finished toy run (toy, train and merge done)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out")
    a = p.parse_args(argv)
    from rdistill.config import RayConfig
    from rdistill.log import setup
    from rdistill.topology import init_ray
    setup()
    scratch = tempfile.mkdtemp(prefix="bench_eval_")
    run = os.path.join(scratch, "run")
    shutil.copytree(a.run_dir, run, ignore=shutil.ignore_patterns(".work", "evaluate", "report", "logs"))
    init_ray(RayConfig())
    runs = []
    try:
        for _ in range(a.repeats):
            for warm in (True, False):
                runs.append(one(run, warm))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "pass_at_1"}), flush=True)
    finally:
        import ray
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    w = statistics.median(r["wall_s"] for r in runs if r["warm"])
    c = statistics.median(r["wall_s"] for r in runs if not r["warm"])
    same = all(r["pass_at_1"] == runs[0]["pass_at_1"] for r in runs)
    out = {"warm_wall_s": w, "cold_wall_s": c, "speedup": round(c / w, 2), "same_pass_at_1": same,
           "warm_engine_starts": runs[0]["engine_starts"], "cold_engine_starts": runs[1]["engine_starts"],
           "models": runs[0]["models"], "samples": runs[0]["samples"], "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(out, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"summary": out, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    sys.exit(main(sys.argv[1:]))
