"""Drop-in for `mergekit-yaml CONFIG.yml OUT_DIR`: the same YAML, merged by rdistill's streaming
Ray tasks (methods: arcee_fusion, ties, dare_ties, dare_linear, task_arithmetic, linear, slerp,
model_stock, the spectral tsv_m, iso_c, iso_cts, and fusion-bench's regmean and
regmean_plusplus, whose models each name their domain data: `- {model: PATH, data: SFT.jsonl}`).

    rdistill merge CONFIG.yml OUT_DIR [--random-seed N] [--out-shard-size 5B] [--max-memory 2G]
                         [--unsafe-truncate-embeddings] [--num-tasks N] [--cuda] [--stats-dir DIR]

--max-memory bounds what the merge's work holds at once (inputs, outputs and the methods'
buffers; default: half the available memory): a tensor too big for it is merged in row blocks,
and a budget too small for one row fails before any work, naming the smallest that works.

A config of several YAML documents (mergekit-multi's form: every document but the last has a
`name`, by which later ones refer to its merge) runs as a chain: the named merges go to
--intermediate-dir (default OUT_DIR.intermediate), the last to OUT_DIR.

Joins the Ray cluster in RAY_ADDRESS (or --ray-address) and merges on its tasks; without one it
merges in this process's threads (no Ray start-up, no worker processes). mergekit options that
do not apply here (--lazy-unpickle, --copy-tokenizer, ...) are accepted and ignored.
"""

from __future__ import annotations

import argparse
import os
import sys


IGNORED_FLAGS = ["--lazy-unpickle", "--no-lazy-unpickle", "--copy-tokenizer", "--no-copy-tokenizer",
                 "--allow-crimes", "--no-allow-crimes", "--low-cpu-memory", "--no-low-cpu-memory",
                 "--write-model-card", "--no-write-model-card", "--safe-serialization",
                 "--clone-tensors", "--no-clone-tensors", "--trust-remote-code", "--quiet", "--read-to-gpu",
                 "--multi-gpu", "--gpu-rich", "--async-write", "-v", "-vv"]


def parse_size(text: str) -> int:
    """mergekit's sizes: 5B, 500M, 1000K or a plain number."""
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise SystemExit(f"error: --out-shard-size {text!r} is invalid: use e.g. 5B, 500M or 1000000")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=__doc__.split("\n\n")[1].strip())
    p.add_argument("config")
    p.add_argument("out_dir")
    p.add_argument("--random-seed", type=int, default=0, help="seed of dare_* and fusion's quantile sample")
    p.add_argument("--out-shard-size", default="5B", help="parameters per output shard (mergekit's unit)")
    p.add_argument("--unsafe-truncate-embeddings", action="store_true",
                   help="cut embeddings/LM heads of different vocab sizes to the common first rows")
    p.add_argument("--max-memory", default=None,
                   help="memory budget of the merge's work: 2G, 500M or bytes (default: half the available memory)")
    p.add_argument("--num-tasks", type=int, default=None, help="merge tasks in flight (default: CPUs)")
    p.add_argument("--cuda", action="store_true", help="merge tasks ask Ray for GPU shares and use them")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (mergekit's)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or local)")
    p.add_argument("--num-threads", "-j", type=int, default=None, help="ignored (one thread per task)")
    p.add_argument("--stats-dir", default=None,
                   help="where regmean's input statistics are kept and reused (default: regmean-stats beside OUT_DIR)")
    p.add_argument("--intermediate-dir", default=None,
                   help="a config of several YAML documents (mergekit-multi's): where its named intermediate "
                        "merges go (default: OUT_DIR.intermediate); the last document's merge goes to OUT_DIR")
    p.add_argument("--no-check-load", action="store_true",
                   help="skip the transformers load check (run when embeddings are cut to a common vocabulary)")
    p.add_argument("--write-threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", default=None,
                   help=argparse.SUPPRESS)
    for flag in IGNORED_FLAGS:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    from rdistill.log import setup
    log = setup()
    from rdistill.errors import RdistillError
    from rdistill.merge import Options, PlanError, load_plan, merge
    from rdistill.merge.budget import parse_size as memory_size
    try:
        budget = memory_size(a.max_memory) if a.max_memory else None
        steps = load_plan(a.config) if os.path.isfile(a.config) else None
        if steps is None:
            raise PlanError(f"{a.config}: config file not found")
        elem = 4 if (steps[-1].out_dtype or steps[-1].dtype or "float32") == "float32" else 2
        gpu = a.cuda or a.device in ("cuda", "auto")
        opts = Options(shard_size=parse_size(a.out_shard_size) * elem, num_tasks=a.num_tasks,
                       seed=a.random_seed, unsafe_truncate_embeddings=a.unsafe_truncate_embeddings,
                       device="gpu" if gpu else "cpu", check_load=not a.no_check_load, stats_dir=a.stats_dir,
                       max_memory=budget)
        inter = (a.intermediate_dir or f"{os.path.abspath(a.out_dir).rstrip('/')}.intermediate") \
            if len(steps) > 1 else None
        if a.ray_address or os.environ.get("RAY_ADDRESS"):
            import ray

            from rdistill.config import RayConfig
            from rdistill.topology import init_ray
            init_ray(RayConfig(address=a.ray_address))
            try:
                out = merge(steps, a.out_dir, options=opts, log=log.info, intermediate_dir=inter)
            finally:
                ray.shutdown()
        else:  # one machine: threads of this process, one per core
            out = merge(steps, a.out_dir, options=opts, log=log.info, intermediate_dir=inter)
    except RdistillError as e:  # a bad plan, input, statistics or result: its one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("merged model written to %s", out)
    return 0


def entry(argv: list[str] | None = None) -> None:
    """main() as a command: exits without the interpreter's teardown once every output file is
    closed and renamed and logs and stdio are flushed. Unloading torch's modules at exit takes
    longer (about 0.6 s here) than merging a small model."""
    import logging
    rc = main(sys.argv[1:] if argv is None else argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
