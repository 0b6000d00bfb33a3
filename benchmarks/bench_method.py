"""Does the method hold across seeds? Reruns train -> merge -> evaluate -> report of a finished toy
run on several seeds (branch data order and initialisation, the merge search's draws, the
evaluation's sampling) and prints each seed's table, the method's claims, and the mean over seeds.

    .venv/bin/python benchmarks/bench_method.py --run-dir runs/toy [--seeds 1 2 3] [--out FILE]
        [--distill]   # the distill stage too (experiment=toy_distill): merge+distill against the mixture

Besides the table and claims, each seed prints the issue's comparisons against the data-mixture
baseline: the chosen merge's (and merge+distill's) mean and every domain, in standard errors of the
difference (errors combined as if independent), and the share of each branch's gain kept.

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


def _se_mean(ses: list[float]) -> float:
    return sum(x * x for x in ses) ** 0.5 / len(ses)


def against_mixture(results: list[dict], model: str, domains: list[str]) -> dict:
    """`model` against the mixture and its branches: z of the mean and of each domain's difference
    (negative: below the mixture), and each domain's gain over the base kept (vs its branch)."""
    at = {(r["model"], r["domain"]): (r["pass_at_1"], r["stderr"]) for r in results}
    z = lambda a, b: (a[0] - b[0]) / max((a[1] ** 2 + b[1] ** 2) ** 0.5, 1e-9)  # noqa: E731
    mean = lambda m: (sum(at[(m, d)][0] for d in domains) / len(domains),  # noqa: E731
                      _se_mean([at[(m, d)][1] for d in domains]))
    out = {"model": model, "mean_z": round(z(mean(model), mean("mixture")), 2), "domains": {}}
    for d in domains:
        base, branch, m = at[("base", d)][0], at[(f"branch:{d}", d)][0], at[(model, d)][0]
        out["domains"][d] = {"z": round(z(at[(model, d)], at[("mixture", d)]), 2),
                             "kept": round((m - base) / (branch - base), 3) if branch > base else None}
    return out


def one(run_dir: str, seed: int, scratch: str, distill: bool = False) -> dict:
    dst = os.path.join(scratch, f"seed{seed}")
    os.makedirs(dst)
    for name in SHARED:
        src = os.path.join(run_dir, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(dst, name))
    t0 = time.time()
    stages = "[train,merge,distill,evaluate,report]" if distill else "[train,merge,evaluate,report]"
    extra = ["experiment=toy_distill", f"distill.seed={seed}"] if distill else []
    p = subprocess.run([sys.executable, "jobs/run.py", f"run_dir={dst}", f"stages={stages}", *extra,
                        f"seed={seed}", f"train.seed={seed}", f"merge.search.seed={seed}",
                        f"eval.sampling.seed={seed}"], cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{p.stderr[-3000:]}")
    report = json.load(open(os.path.join(dst, "report", "manifest.json")))["result"]
    results = json.load(open(os.path.join(dst, "evaluate", "results.json")))
    domains = sorted(report["method"]["domains"])
    vs = [against_mixture(results, m, domains) for m in (report["merged"], "merge+distill")
          if any(r["model"] == m for r in results)]
    stage_s = {}
    for stage in ("train", "merge", "distill"):
        mf = os.path.join(dst, stage, "manifest.json")
        if os.path.exists(mf):
            stage_s[stage] = json.load(open(mf)).get("wall_time_s")
    return {"seed": seed, "wall_s": round(time.time() - t0, 1), "table": report["table"],
            "method": report["method"], "vs_mixture": vs, "stage_s": stage_s, "cost": report.get("cost"),
            "pass_at_1": {f"{r['model']}/{r['domain']}": r["pass_at_1"] for r in results}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/toy", help="a finished toy run (toy, generate and verify done)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out")
    p.add_argument("--distill", action="store_true", help="run the distill stage too (experiment=toy_distill)")
    a = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_method_")
    runs = []
    try:
        for s in a.seeds:
            runs.append(one(os.path.abspath(a.run_dir), s, scratch, a.distill))
            r = runs[-1]
            print(f"\n== seed {s} ({r['wall_s']:.0f} s; stages {r['stage_s']})\n{r['table']}")
            for v in r["vs_mixture"]:
                print(f"  {v['model']} vs mixture: mean {v['mean_z']:+.1f} se; " + ", ".join(
                    f"{d} {x['z']:+.1f} se (gain kept {x['kept']:.0%})" for d, x in v["domains"].items()))
            mix = (r["cost"] or {}).get("mixture_wall_s")
            if r["stage_s"].get("distill") and mix:
                print(f"  distill stage {r['stage_s']['distill']:.0f} s = {r['stage_s']['distill'] / mix:.2f}x the "
                      f"mixture's training ({mix:.0f} s wall)")
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
