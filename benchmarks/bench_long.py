"""Long rows: sequence parallelism 2 vs 1, and a large SFT set tokenized on the driver vs Ray Data.

    .venv/bin/python benchmarks/bench_long.py [--part all|sp|sft] [--steps 20] [--seq 2048]
                                              [--rows 1000000] [--pack-len 2048] [--workdir DIR]

sp: the shipped toy base (rdistill/toy/assets/base, its max_position_embeddings raised to --seq)
trains --steps steps through `rdistill.train.sft.train_sft` on the same packed rows of --seq
tokens (one row per step), with train.sequence_parallel_size=2 on 2 CPU Ray Train workers (gloo,
Ulysses all-to-all) and without SP on 1 worker. Prints both loss curves, the max abs difference,
ms/step, and checks both runs packed the same rows.

sft: writes --rows synthetic SFT samples (the chat JSONL train reads: long-tailed arithmetic
traces, as in bench_train.py), then tokenizes and packs them into rows of --pack-len tokens with
the toy tokenizer, once on the driver (train.tokenize_with_ray_data=false) and once as a Ray Data
job (true), each in a fresh process: wall time and peak driver RSS, and a check that both wrote
identical packed rows byte for byte.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import write_traces  # noqa: E402  (the same long-tailed traces as the packing line)

TOY_BASE = ROOT / "rdistill" / "toy" / "assets" / "base"


def toy_base(out: Path, max_len: int) -> str:
    """A copy of the shipped toy base that accepts rows of max_len tokens: prepare_data refuses a
    max_len over max_position_embeddings (512 in the toy), and RoPE needs no new weights for more."""
    shutil.copytree(TOY_BASE, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max_len)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(out)


def same_rows(a: Path, b: Path, block: int = 1 << 24) -> bool:
    """Byte-for-byte equality of two rows directories, a block at a time (a million samples are
    ~100M tokens per column: comparing whole memmaps would pull both into memory)."""
    import numpy as np
    for col in ("offsets", "ids", "targets", "positions"):
        x, y = np.load(a / f"{col}.npy", mmap_mode="r"), np.load(b / f"{col}.npy", mmap_mode="r")
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        for s in range(0, len(x), block):
            if not np.array_equal(x[s:s + block], y[s:s + block]):
                return False
    return True


# ---- sequence parallel 2 vs 1 -------------------------------------------------------------------

def bench_sp(args, tmp: Path) -> None:
    import ray

    from rdistill.config import RayConfig, TrainConfig
    from rdistill.topology import init_ray
    from rdistill.train.sft import train_sft
    model = toy_base(tmp / "base-sp", args.seq)
    sft = tmp / "sp.jsonl"
    # ~115 tokens per sample with the toy tokenizer: enough samples for --steps full rows.
    write_traces(sft, math.ceil(args.steps * args.seq / 100) + 20, seed=1)
    init_ray(RayConfig())
    curves, times, rows = {}, {}, {}
    try:
        for sp in (1, 2):
            # SP 2 on 2 workers is one data-parallel replica, so each step trains on the same one
            # row as 1 worker without SP (2 workers without SP would be 2 replicas on 2 rows per
            # step: another curve). ZeRO-3 by default: the path whose gradient scaling differs.
            cfg = TrainConfig(num_workers=sp, sequence_parallel_size=sp, zero_stage=args.zero, precision="fp32",
                              max_steps=args.steps, lr=args.lr, warmup_ratio=0.0, micro_batch_size=1,
                              max_len=args.seq, packing=True, checkpoint_every=10 ** 6, max_failures=0,
                              tokenize_with_ray_data=False)
            m = train_sft(model, [str(sft)], str(tmp / f"out-sp{sp}"), cfg, name=f"sp{sp}",
                          storage_dir=str(tmp / "store"))
            prog = [json.loads(l) for l in (tmp / "store" / f"sp{sp}-progress.jsonl").read_text().splitlines()]
            curves[sp] = [r["loss"] for r in prog]
            # First step left out of the time: it includes DeepSpeed's and the kernels' warm-up.
            times[sp] = statistics.median(r["step_time_s"] for r in prog[1:] or prog)
            rows[sp] = m["rows"]
    finally:
        ray.shutdown()
    same = same_rows(tmp / "store" / "sp1-rows", tmp / "store" / "sp2-rows")
    diff = [abs(a - b) for a, b in zip(curves[1], curves[2])]
    rel = max(d / abs(a) for d, a in zip(diff, curves[1]))
    print(f"\nsequence parallel, toy base ({args.seq}-token rows, 1 row per step, fp32, ZeRO-{args.zero}, "
          f"lr {args.lr}): {rows[1]} packed rows, same rows in both runs: {'yes' if same else 'NO'}\n")
    print("| step | loss SP 1 (1 worker) | loss SP 2 (2 workers) | abs diff |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(zip(curves[1], curves[2]), 1):
        print(f"| {i} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} |")
    print(f"\nmax abs diff {max(diff):.2e}, max rel diff {rel:.2e} (tolerance {args.tol:g} relative: "
          f"{'within' if rel <= args.tol else 'OUTSIDE'}); median ms/step (step 1 left out): "
          f"SP 1 {times[1] * 1e3:.0f}, SP 2 {times[2] * 1e3:.0f}", flush=True)


# ---- SFT set: driver vs Ray Data ----------------------------------------------------------------

def _prepare_child(model: str, sft: str, pack_len: int, ray_data: bool, rows_dir: str, q) -> None:
    """One path of prepare_data in this (fresh) process: its peak RSS is the driver's alone (Ray's
    raylet and Data actors are other processes, not counted in RUSAGE_SELF)."""
    import resource

    # Imports first, in both paths alike, so that time and memory are the work's, not the imports'.
    import ray.data  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    import rdistill.data.tokenize_ray  # noqa: F401
    from rdistill.config import RayConfig, TrainConfig
    from rdistill.train.sft import prepare_data
    ray_s = 0.0
    if ray_data:  # started apart from the timed part: a pipeline run has its cluster already
        from rdistill.topology import init_ray
        t = time.perf_counter()
        init_ray(RayConfig())
        ray_s = time.perf_counter() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    info = prepare_data(model, [sft], TrainConfig(max_len=pack_len, tokenize_with_ray_data=ray_data,
                                                  micro_batch_size=1), Path(rows_dir))
    wall = time.perf_counter() - t
    q.put({"info": info, "wall_s": wall, "ray_start_s": ray_s, "rss_before": rss0,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    if ray_data:
        import ray
        ray.shutdown()


def child_result(p, q):
    """The child's one result; fails instead of waiting forever when the child dies without one.
    Read before join: a child blocks on exit until its queue is drained."""
    import queue
    while True:
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"benchmark child died (exit code {p.exitcode}): see its traceback above") from None
    p.join()
    return out


def bench_sft(args, tmp: Path) -> None:
    import multiprocessing as mp
    model = toy_base(tmp / "base-sft", args.pack_len)
    sft = tmp / "sft-big.jsonl"
    t = time.perf_counter()
    write_traces(sft, args.rows, seed=2)
    print(f"wrote {args.rows:,} SFT samples ({sft.stat().st_size / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - t:.0f}s", flush=True)
    ctx = mp.get_context("spawn")
    res = {}
    for ray_data in (False, True):
        q = ctx.Queue()
        p = ctx.Process(target=_prepare_child,
                        args=(model, str(sft), args.pack_len, ray_data, str(tmp / f"rows-{ray_data}"), q))
        p.start()
        res[ray_data] = child_result(p, q)
        r = res[ray_data]
        print(f"{'Ray Data' if ray_data else 'driver'}: {r['wall_s']:.1f}s, peak driver RSS "
              f"{r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    same = same_rows(tmp / "rows-False", tmp / "rows-True")
    info = res[False]["info"]
    print(f"\nSFT set: {info['samples']:,} samples, {info['kept']:,} kept, {info['tokens']:,} tokens, "
          f"{info['rows']:,} packed rows of <= {args.pack_len} tokens (toy tokenizer)\n")
    print("| path | wall s | Ray start s | driver RSS after imports GiB | peak driver RSS GiB | "
          "peak - after imports GiB |")
    print("|---|---|---|---|---|---|")
    for ray_data, name in ((False, "driver (tokenize_files + save_rows)"), (True, "Ray Data (tokenize_and_pack)")):
        r = res[ray_data]
        print(f"| {name} | {r['wall_s']:.1f} | {r['ray_start_s']:.1f} | {r['rss_before'] / 2**30:.2f} | "
              f"{r['peak_rss'] / 2**30:.2f} | {(r['peak_rss'] - r['rss_before']) / 2**30:.2f} |")
    d, r = res[False], res[True]
    grown = lambda x: max(1, x["peak_rss"] - x["rss_before"])  # noqa: E731
    print(f"\nRay Data / driver: wall {r['wall_s'] / d['wall_s']:.2f}x, peak driver RSS "
          f"{r['peak_rss'] / d['peak_rss']:.2f}x (over the imports: {grown(r) / grown(d):.2f}x); "
          f"same counts: {'yes' if d['info'] == r['info'] else 'NO'}; identical packed rows: {'yes' if same else 'NO'}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "sp", "sft"], default="all")
    ap.add_argument("--steps", type=int, default=20, help="training steps of each SP run")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per packed row of the SP runs")
    ap.add_argument("--zero", type=int, default=3, help="ZeRO stage of the SP runs")
    # A large lr moves the weights far in few steps, so a gradient that SP got wrong shows in the curve.
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tol", type=float, default=1e-3, help="max relative loss difference SP 2 vs 1")
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic SFT samples to tokenize and pack")
    ap.add_argument("--pack-len", type=int, default=2048, help="max_len of the packed SFT rows")
    ap.add_argument("--workdir", default=None, help="where the data goes (~3 GB per million rows); kept if given")
    args = ap.parse_args()

    from rdistill.log import setup
    setup()
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-long-")).absolute()
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for part, run in (("sp", bench_sp), ("sft", bench_sft)):
            if args.part in ("all", part):
                shutil.rmtree(tmp / part, ignore_errors=True)  # a reused --workdir starts clean
                (tmp / part).mkdir()
                run(args, tmp / part)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
