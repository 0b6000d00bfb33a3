"""The documented entry point, as users run it: `ray job submit --working-dir . -- python jobs/run.py`
against a cluster started with `ray start --head` on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head node of our own, stopped by its process group id (never `ray stop`, which would
    stop every Ray on the machine)."""
    gcs, dash = _free_port(), _free_port()
    # Ports of our own for every per-node agent: the defaults (e.g. the dashboard agent's 52365)
    # are taken by any other Ray on this machine, such as the test session's cluster, and a head
    # whose agent cannot bind answers every job submission with "No available agent".
    agents = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
              f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
              f"--ray-client-server-port={_free_port()}"]
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         "--include-dashboard=true", "--disable-usage-stats", *agents],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(1)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _submit(url: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [f"{VENV_BIN}/ray", "job", "submit", "--address", url, "--working-dir", ".", "--",
           "python", "jobs/run.py", *args]
    deadline = time.time() + 180  # the dashboard's job agent comes up a little after the dashboard
    while True:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in p.stdout + p.stderr or time.time() > deadline:
            return p
        time.sleep(2)


def test_job_submit_dry_run_and_a_real_stage(ray_head, tmp_path):
    url, env = ray_head
    p = _submit(url, env, "dry_run=true", f"run_dir={tmp_path}/dry")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "rdistill plan: run 'toy'" in p.stdout and "[train]" in p.stdout
    assert "cluster at" in p.stdout  # the job's driver saw RAY_ADDRESS and planned against the cluster

    p = _submit(url, env, "stages=[toy]", f"run_dir={tmp_path}/run")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    manifest = json.loads((tmp_path / "run" / "toy" / "manifest.json").read_text())
    assert manifest["stage"] == "toy"
    for split in ("train", "dev", "test"):
        assert (tmp_path / "run" / "toy" / "data" / "math" / f"{split}.jsonl").stat().st_size > 0
    assert (tmp_path / "run" / "toy" / "models" / "teacher" / "config.json").exists()
