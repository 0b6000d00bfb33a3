"""Teacher generation throughput through Ray Data + vLLM on a tiny random Qwen2 (CPU).

    .venv/bin/python benchmarks/bench_generate.py [--small 32] [--large 128] [--max-tokens 64]

Runs `rdistill.generate.llm.generate` twice (small and large prompt sets, one engine start
each) and reports end-to-end completion tokens/s for each, and the steady-state rate from the
difference of the two, which cancels the engine start and pipeline warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def run_once(model: str, n: int, max_tokens: int, batch_size: int) -> tuple[float, int]:
    import ray

    from rdistill.config import SamplingConfig
    from rdistill.generate.llm import expand_samples, generate
    from rdistill.generate.spec import LLMSpec
    spec = LLMSpec(model=model, name="tiny", max_model_len=256, batch_size=batch_size,
                   sampling=SamplingConfig(max_tokens=max_tokens))
    rows = expand_samples([{"id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]}
                           for i in range(n)], 1, 0)
    t0 = time.time()
    out = generate(ray.data.from_items(rows), spec).materialize()
    wall = time.time() - t0
    toks = int(sum(r["completion_tokens"] for r in out.iter_rows()))
    return wall, toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=32)
    ap.add_argument("--large", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    from rdistill.config import RayConfig
    from rdistill.toy.model import tiny_test_model
    from rdistill.topology import init_ray
    import ray
    init_ray(RayConfig(num_cpus=8))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = str(tiny_test_model(Path(tmp) / "tiny"))
            (w1, t1), (w2, t2) = (run_once(model, n, a.max_tokens, a.batch_size) for n in (a.small, a.large))
    finally:
        ray.shutdown()
    res = {"small": {"prompts": a.small, "wall_s": round(w1, 1), "completion_tokens": t1,
                     "tokens_per_s": round(t1 / w1, 1)},
           "large": {"prompts": a.large, "wall_s": round(w2, 1), "completion_tokens": t2,
                     "tokens_per_s": round(t2 / w2, 1)},
           "steady_tokens_per_s": round((t2 - t1) / (w2 - w1), 1) if w2 > w1 else None,
           "cpus": os.cpu_count(), "max_tokens": a.max_tokens, "batch_size": a.batch_size}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    main()
