"""The whole method end to end through `jobs/run.py`, as a user runs it: the toy world through real
vLLM, Ray Data, Ray Train + DeepSpeed, the merge, evaluation and report (smaller than the default
run so that CI stays short), then a rerun that skips every stage. (That a changed config reruns only that stage and the ones
after it is tested on the runner itself, in test_pipeline.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SMALL = ["toy.n_train=80", "toy.n_dev=10", "toy.n_test=20", "generate.sampling.n=2",
         "eval.sampling.n=2", "train.epochs=2"]
STAGES = ["toy", "generate", "verify", "train", "merge", "evaluate", "report"]


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_default_pipeline_end_to_end_then_rerun_skips(tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    p = _run([f"run_dir={run_dir}", *SMALL], timeout=1500)
    wall = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    for stage in STAGES:
        m = json.loads((run_dir / stage / "manifest.json").read_text())
        assert m["stage"] == stage and m["wall_time_s"] > 0
    # the SFT sets were built from verified teacher answers and the branches trained on them
    funnel = json.loads((run_dir / "verify" / "manifest.json").read_text())["result"]["funnel"]
    for domain in ("math", "code", "science"):
        assert funnel[domain]["generated"] == 80 * 2
        assert 0 < funnel[domain]["kept"] <= funnel[domain]["generated"]
        assert (run_dir / "train" / domain / "model.safetensors").exists() or \
            list((run_dir / "train" / domain).glob("*.safetensors"))
    assert list((run_dir / "merge" / "fusion" / "final").glob("*.safetensors"))
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    models = {r["model"] for r in results}
    assert {"base", "branch:math", "branch:code", "branch:science"} <= models
    assert any(m.startswith("merge") or "fusion" in m for m in models)
    assert any("teacher" in m for m in models)
    for r in results:
        assert r["n_prompts"] == 20 and r["n_samples"] == 2 and 0.0 <= r["pass_at_1"] <= 1.0
    # the run ends with the TinyR1-style table
    header = next(l for l in p.stdout.splitlines() if l.startswith("model "))
    assert header.split() == ["model", "code", "math", "science", "mean"]
    assert any(l.startswith("base (") for l in p.stdout.splitlines())
    assert (run_dir / "report" / "report.md").exists()
    print(f"end-to-end wall time: {wall:.0f}s")

    # a rerun of the same command skips every stage and still prints the table
    p2 = _run([f"run_dir={run_dir}", *SMALL], timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}: current, skipped" in p2.stderr
