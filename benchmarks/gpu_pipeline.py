"""The GPU path: the whole toy pipeline with vLLM and DeepSpeed on one GPU, with stage timings.

    RDISTILL_BACKEND=gpu bash jobs/setup.sh && .venv/bin/python benchmarks/gpu_pipeline.py [RUN_DIR]

Runs the same stages as the default CPU run (toy, generate, verify, train, merge, evaluate, report)
with device=gpu: engines take GPU placement bundles, training uses one GPU worker per branch in
bf16. Prints each stage's wall time from its manifest, then the report's table. Tests never need a
GPU; run this when one is at hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OVERRIDES = [
    "device=gpu",
    "train.num_workers=1", "train.gpus_per_worker=1", "train.cpus_per_worker=2", "train.precision=bf16",
    "teacher.engine.engine_kwargs={gpu_memory_utilization: 0.25}",
]


def main() -> int:
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="rdistill-gpu-"))
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device visible: this script is for a GPU machine (RDISTILL_BACKEND=gpu setup)")
        return 1
    print(f"GPU: {torch.cuda.get_device_name(0)}; run_dir={run_dir}")
    cmd = [sys.executable, str(REPO / "jobs" / "run.py"), f"run_dir={run_dir}", *OVERRIDES, *sys.argv[2:]]
    rc = subprocess.call(cmd, cwd=REPO)
    print("\nstage timings (s):")
    total = 0.0
    for stage in ("toy", "generate", "verify", "train", "merge", "evaluate", "report"):
        m = run_dir / stage / "manifest.json"
        if m.exists():
            wall = json.loads(m.read_text())["wall_time_s"]
            total += wall
            print(f"  {stage:<9} {wall:8.1f}")
    print(f"  {'total':<9} {total:8.1f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
