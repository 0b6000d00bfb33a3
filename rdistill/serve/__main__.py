"""Serve one model on its own, outside the pipeline:

    python -m rdistill.serve runs/toy/merge/fusion/final --name toy
    python -m rdistill.serve merged --run-dir runs/toy          # a run's model reference
    python -m rdistill.serve Qwen/Qwen2.5-0.5B-Instruct --device gpu --api-key-env MY_KEY

Runs in the foreground until Ctrl-C (or deploys and returns with --no-block, for a cluster
joined through RAY_ADDRESS / --address).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rdistill.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory, Hugging Face id, or with --run-dir a reference "
                                 "(merged, branch:<domain>, merge:<candidate>, toy:teacher)")
    p.add_argument("--name", help="served model name (default: the directory's name)")
    p.add_argument("--run-dir", help="resolve MODEL as a reference into this run directory")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", help="environment variable holding the key clients must send")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--reasoning-parser", default="deepseek_r1", help="'none' to turn it off")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster")
    p.add_argument("--no-block", action="store_true", help="deploy and return")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from rdistill.config import ConfigError, EngineConfig, RayConfig, ServeConfig
    from rdistill.config.fields import check
    from rdistill.log import setup
    from rdistill.refs import resolve_model
    from rdistill.rundir import RunDir
    from rdistill.serve.app import ServeSpec, check_model_dir, deploy, undeploy
    from rdistill.serve.stage import serve_forever
    from rdistill.topology import init_ray
    import ray
    a = parse(argv)
    log = setup()
    ours = not ray.is_initialized()  # leave a caller's Ray alone
    try:
        sc = ServeConfig(served_name=a.name, min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                         port=a.port, host=a.host, api_key_env=a.api_key_env,
                         engine=EngineConfig(max_model_len=a.max_model_len,
                                             tensor_parallel_size=a.tensor_parallel_size), blocking=not a.no_block,
                         reasoning_parser=None if a.reasoning_parser == "none" else a.reasoning_parser)
        check(sc, "serve.")
        if a.no_block and not (a.address or os.environ.get("RAY_ADDRESS")):
            raise ConfigError("--no-block needs a cluster to outlive this process: pass --address "
                              "or set RAY_ADDRESS (a local cluster ends when this command does)")
        model = resolve_model(a.model, RunDir(a.run_dir)) if a.run_dir else resolve_model(a.model, RunDir("."))
        name = a.name or os.path.basename(model.rstrip("/"))
        spec = ServeSpec.from_config(sc, model, name, a.device)
        check_model_dir(model)  # before starting Ray: a typo fails in a second
        init_ray(RayConfig(address=a.address, num_cpus=a.num_cpus))
        print(json.dumps(deploy(spec)), flush=True)
        if a.no_block:
            return 0
        try:
            serve_forever(spec)
        finally:
            undeploy(spec)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    log.info("serve: stopped")
    return 0


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    sys.exit(main(sys.argv[1:]))
