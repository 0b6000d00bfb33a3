"""The evaluate stage with warm engines against one engine per model, side by side on a copy of a
finished toy run (same models, prompts, seeds): wall time, engine starts, and that all give the
same pass@1.

    .venv/bin/python benchmarks/bench_evaluate.py --run-dir runs/toy [--modes warm,cold,per_model]
        [--repeats 1] [--out FILE]

Modes:
- warm: the stage as shipped (an engine per model family, weights reloaded in place);
- cold: the same engine actors, but a new vLLM engine per model (eval.warm_engines=false);
- per_model: what the stage did before warm engines, and still does for models no engine can
  share: each model through its own Ray Data + vLLM pipeline (rdistill.llm.batch.generate).
Runs alternate (warm, cold, per_model, warm, ...) so that all meet the same machine load.
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


def _per_model(targets, rows, cfg, work, n_engines) -> dict:
    """The pre-warm-engine path for every model: its own Ray Data + vLLM pipeline, n at once."""
    from rdistill.evaluate import stage
    from rdistill.parallel import run_at_most
    run_at_most(n_engines, [lambda t=t: stage.score_model(t, [r for s in t.splits for r in rows[s]], cfg, work)
                            for t in targets], name="eval")
    return {"engine_starts": len(targets), "weight_reloads": 0, "how": {}}


def one(run_dir: str, mode: str) -> dict:
    from rdistill.cli.compose import load
    from rdistill import pipeline
    from rdistill.evaluate import stage
    from rdistill.rundir import RunDir
    shutil.rmtree(os.path.join(run_dir, ".work", "evaluate"), ignore_errors=True)  # no cached samples
    cfg = load([f"run_dir={run_dir}", f"eval.warm_engines={str(mode != 'cold').lower()}"])
    shipped = stage.score_warm
    if mode == "per_model":
        stage.score_warm = _per_model
    t0 = time.time()
    try:
        res = pipeline.run_stage(cfg, RunDir(run_dir), "evaluate")["result"]
    finally:
        stage.score_warm = shipped
    return {"mode": mode, "wall_s": round(time.time() - t0, 1), "models": res["models"],
            "engine_starts": res["engine_starts"], "samples": res["samples"], "pass_at_1": res["pass_at_1"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/toy", help="a finished toy run (toy, train and merge done)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", default="warm,cold,per_model")
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
            for mode in a.modes.split(","):
                runs.append(one(run, mode))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "pass_at_1"}), flush=True)
    finally:
        import ray
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    modes = a.modes.split(",")
    wall = {m: statistics.median(r["wall_s"] for r in runs if r["mode"] == m) for m in modes}
    first = {m: next(r for r in runs if r["mode"] == m) for m in modes}
    out = {"wall_s": wall, "engine_starts": {m: first[m]["engine_starts"] for m in modes},
           "speedup_vs_warm": {m: round(wall[m] / wall["warm"], 2) for m in modes} if "warm" in wall else {},
           "same_pass_at_1_as_warm": {m: first[m]["pass_at_1"] == first["warm"]["pass_at_1"] for m in modes}
           if "warm" in first else {},
           "models": runs[0]["models"], "samples": runs[0]["samples"], "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(out, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"summary": out, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    sys.exit(main(sys.argv[1:]))
