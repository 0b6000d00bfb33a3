"""The documented entry point, as users run it: `ray job submit --working-dir . -- python jobs/run.py`
against a cluster started with `ray start --head` on loopback (conftest's `ray_head`; test_e2e.py
submits the whole pipeline to one too)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_job_submit_dry_run(ray_head, tmp_path):
    p = ray_head.submit("dry_run=true", f"run_dir={tmp_path}/dry")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "rdistill plan: run 'toy'" in p.stdout and "[train]" in p.stdout
    assert "cluster at" in p.stdout  # the job's driver saw RAY_ADDRESS and planned against the cluster


def test_job_submit_engine_that_cannot_start_is_one_line(ray_head, tmp_path):
    """An engine asked for more memory than its node has: the job ends in one line naming the
    setting (not Ray's ActorDiedError), and no traceback reaches the job's console."""
    p = ray_head.submit(f"run_dir={tmp_path}/run", "stages=[toy,generate]", "toy.n_train=4",
                        "teacher.engine.cpu_kvcache_gib=1000")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    # (ray job submit repeats the job's last lines when it fails: the same line twice)
    errors = sorted({l for l in out.splitlines() if l.startswith("error: ")})
    assert len(errors) == 1, out[-3000:]
    assert "1000 GiB KV cache" in errors[0] and "teacher.engine.cpu_kvcache_gib" in errors[0], errors
    assert "Traceback" not in out and "ActorDiedError" not in out, out[-3000:]
    # the engine's own traceback is kept, in the run's logs
    logs = "".join(f.read_text() for f in (tmp_path / "run" / "logs").glob("*.log"))
    assert "requested memory for kv" in logs
    assert json.loads((tmp_path / "run" / "toy" / "manifest.json").read_text())["stage"] == "toy"
