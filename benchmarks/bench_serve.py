"""Load test of the served toy model: >= 200 chat completions at concurrency 16 through Ray Serve
LLM's OpenAI-compatible API; prints and saves requests/s, latency percentiles, tokens/s, errors.

    .venv/bin/python benchmarks/bench_serve.py                       # deploy a toy model, test it
    .venv/bin/python benchmarks/bench_serve.py --model runs/toy/toy/models/teacher
    .venv/bin/python benchmarks/bench_serve.py --url http://127.0.0.1:8000/v1 --name toy   # running endpoint

Without --model it serves a tiny random Qwen2 (`rdistill.toy.model.tiny_test_model`): its
answers are noise, but it runs the same engine, Serve and HTTP path a trained one does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory to deploy (default: a tiny random toy model)")
    p.add_argument("--url", help="test this running endpoint instead of deploying one")
    p.add_argument("--name", default="toy", help="served model name")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", help="environment variable with the endpoint's key")
    p.add_argument("--out", help="also write the figures to this JSON file")
    a = p.parse_args(argv)

    from rdistill.log import setup
    from rdistill.serve.loadtest import format_report, load_test
    log = setup()
    key = os.environ.get(a.api_key_env) if a.api_key_env else None
    info: dict = {"url": a.url}
    spec, scratch = None, None
    if not a.url:
        from rdistill.config import RayConfig
        from rdistill.serve.app import ServeSpec, deploy
        from rdistill.topology import init_ray
        model = a.model
        if model is None:
            from rdistill.toy.model import tiny_test_model
            scratch = tempfile.mkdtemp(prefix="bench_serve_")
            model = str(tiny_test_model(os.path.join(scratch, "toy")))
        init_ray(RayConfig())
        from rdistill.config import EngineConfig
        spec = ServeSpec(model=model, served_name=a.name, port=a.port, api_key=key,
                         engine=EngineConfig(max_model_len=a.max_model_len))
        info = deploy(spec)
    try:
        # No warm-up of our own: measured from the moment the endpoint first reports ready, the
        # first requests must see the latency of later ones (the server warms itself up).
        first = load_test(info["url"], a.name, n_requests=a.concurrency, concurrency=a.concurrency,
                          max_tokens=a.max_tokens, api_key=key)
        result = load_test(info["url"], a.name, n_requests=a.requests, concurrency=a.concurrency,
                           max_tokens=a.max_tokens, api_key=key)
        result["first_after_ready"] = first
    finally:
        if spec is not None:
            import ray
            from ray import serve
            serve.shutdown()
            ray.shutdown()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("serve load test: %s", format_report(result))
    result.update(deploy=info, cpus=os.cpu_count(), loadavg_1m=round(os.getloadavg()[0], 1),
                  date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    sys.exit(main(sys.argv[1:]))
