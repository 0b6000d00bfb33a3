"""Benchmark of the verify stage: the funnel per domain, verification rows/s, sandboxed programs/s.

    .venv/bin/python benchmarks/bench_verify.py                      # synthetic toy-world teacher output
    .venv/bin/python benchmarks/bench_verify.py --run-dir runs/toy   # a real run's generate output

Without --run-dir it builds a toy-world generate output in a temp folder: the toy domains' train
prompts (rdistill.toy.domains), two samples each, mostly the correct trace, with teacher mistakes
at fixed rates (wrong final answer, cut at max tokens, missing </think>, broken program, a repeat
of the other sample), 5 test problems per domain leaked into the train prompts, and the toy
dev/test prompts to decontaminate against.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "jobs")]

from rdistill.cli.compose import load  # noqa: E402  (the Hydra composition of conf/, as jobs/run.py uses)
from rdistill.config import SandboxConfig  # noqa: E402
from rdistill.rundir import RunDir, write_json_atomic  # noqa: E402


def _mistake(domain: str, completion: str, rng: random.Random) -> tuple[str, str]:
    """A flawed variant of a correct completion and the finish reason it came with."""
    kind = rng.choice(["wrong", "wrong", "length", "format"])
    if kind == "length":
        return completion[: len(completion) // 2], "length"
    if kind == "format":
        return completion.replace("</think>", " "), "stop"
    if domain == "math":
        head, _, num = completion.rpartition("\\boxed{")
        return f"{head}\\boxed{{{int(num.split('}')[0]) + 1}}}.", "stop"
    if domain == "code":
        return completion.replace("return ", "return 1 + "), "stop"
    letter = completion[-1]
    return completion[:-1] + ("A" if letter != "A" else "B"), "stop"


def synthetic_run(root: Path, n_prompts: int, seed: int = 0) -> None:
    """Toy prompts and a plausible teacher's samples, laid out as toy + generate stage outputs."""
    import pandas as pd
    from rdistill.toy.domains import DOMAINS, problems, records
    rng = random.Random(seed)
    data = root / "toy" / "data"
    for d in DOMAINS:
        for split, n in (("dev", 40), ("test", 100)):
            (data / d).mkdir(parents=True, exist_ok=True)
            (data / d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(d, split, n, seed)))
        rows = []
        leaked = list(zip(range(5), problems(d, "test", seed)))  # 5 test problems leaked into train
        for i, p in list(zip(range(n_prompts), problems(d, "train", seed))) + leaked:
            pid = f"toy-{d}-train-{i:05d}" if (i, p) not in leaked else f"leak-{d}-{i}"
            for k in range(2):
                comp, finish = p.completion, "stop"
                if rng.random() < 0.25:
                    comp, finish = _mistake(d, comp, rng)
                msgs = [{"role": "user", "content": p.prompt}]
                rows.append({"id": f"{pid}#{k}", "prompt_id": pid, "sample_idx": k, "domain": d, "messages": msgs,
                             "prompt": p.prompt, "completion": comp, "finish_reason": finish, "prompt_tokens": 20,
                             "completion_tokens": len(comp) // 2, "teacher": "synthetic", "sampling": "{}",
                             "error": None, "gold": p.gold, "tests": p.tests, "entry_point": p.entry_point})
        (root / "generate").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(root / "generate" / f"{d}.parquet")
    for stage in ("toy", "generate"):
        write_json_atomic(root / stage / "manifest.json", {"fingerprint": f"synthetic-{stage}"})


def sandbox_rate(n: int, workers: int) -> float:
    """Programs/s of the toy code domain's tests through the sandbox, `workers` at a time."""
    from rdistill.toy.domains import problems
    from rdistill.scoring.sandbox import run_program
    progs = [f"{p.gold}\n{p.tests}\n" for _, p in zip(range(n), problems("code", "train", 0))]
    t0 = time.time()
    with cf.ThreadPoolExecutor(workers) as ex:
        ok = sum(r.status == "ok" for r in ex.map(lambda s: run_program(s, None, SandboxConfig()), progs))
    assert ok == n, f"only {ok}/{n} correct toy programs passed"
    return n / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="a run whose generate stage is done (default: synthetic toy output)")
    ap.add_argument("--prompts", type=int, default=200, help="train prompts per domain (synthetic)")
    ap.add_argument("--sandbox-programs", type=int, default=32)
    a = ap.parse_args()
    import ray
    from rdistill import pipeline
    from rdistill.log import setup
    setup()
    for workers in (1, 2):
        print(f"sandbox: {sandbox_rate(a.sandbox_programs, workers):.2f} programs/s with {workers} at a time")
    with tempfile.TemporaryDirectory() as tmp:
        root = a.run_dir or tmp
        if not a.run_dir:
            synthetic_run(Path(tmp), a.prompts)
        cfg = load([f"run_dir={root}", "ray.num_cpus=8"])
        from rdistill.topology import init_ray
        init_ray(cfg.ray)
        t0 = time.time()
        res = pipeline.run_stage(cfg, RunDir(cfg.run_dir), "verify")["result"]
        wall = time.time() - t0
        ray.shutdown()
    steps = [s for s, _ in next(iter(res["funnel"].values()))]
    print("| domain | " + " | ".join(steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for d, f in res["funnel"].items():
        print(f"| {d} | " + " | ".join(str(n) for _, n in f) + " |")
    print("dropped:", json.dumps(res["dropped"]))
    print(f"verify stage: {res['rows']} rows in {wall:.1f} s = {res['rows'] / wall:.1f} rows/s "
          f"(stage-internal {res['rows_per_s']} rows/s)")


if __name__ == "__main__":
    main()
