"""Shared fixtures: one local Ray cluster per test session (each start costs seconds)."""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh local Ray cluster with enough logical CPUs for Data checkpointing and Serve."""
    import ray
    from rdistill.config import RayConfig
    from rdistill.topology import init_ray
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(RayConfig(num_cpus=8))
    yield ray
    ray.shutdown()


VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A `ray start --head` cluster on loopback, as a user starts one, and `ray job submit` to it."""

    def __init__(self, url: str, env: dict, pgid: int):
        self.url, self.env, self.pgid = url, env, pgid

    def submit(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . -- python jobs/run.py ARGS` from the checkout."""
        cmd = [f"{VENV_BIN}/ray", "job", "submit", "--address", self.url, "--working-dir", ".", "--",
               "python", "jobs/run.py", *args]
        deadline = time.time() + 180  # the dashboard's job agent comes up a little after the dashboard
        while True:
            p = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in p.stdout + p.stderr or time.time() > deadline:
                return p
            time.sleep(2)

    def processes(self) -> list[str]:
        """Command lines of the processes the head node started (its process group's session)."""
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    sid = int(f.read().rsplit(")", 1)[1].split()[3])  # state ppid pgrp session
                if sid != self.pgid:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
            except (OSError, ValueError, IndexError):
                continue
        return out


@pytest.fixture(scope="module")
def ray_head():
    """A head node of our own (8 logical CPUs, what a CPU-only node running the pipeline needs),
    stopped by its process group id (never `ray stop`, which would stop every Ray on the machine).
    One per module: a cluster left running would be joined by any later bare `ray.init()`."""
    gcs, dash = free_port(), free_port()
    # Ports of our own for every per-node agent: the defaults (e.g. the dashboard agent's 52365)
    # are taken by any other Ray on this machine, such as the test session's cluster, and a head
    # whose agent cannot bind answers every job submission with "No available agent".
    agents = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
              f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
              f"--ray-client-server-port={free_port()}"]
    # Token authentication as the README's quick start sets it up (Ray 2.60 turns it on for a head
    # started where ~/.ray/auth_token exists, but its CLI sends the token only in token mode).
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="token")
    for k in ("RAY_ADDRESS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_RPC_BASE_PATH"):  # as on a user's shell
        env.pop(k, None)
    subprocess.run([f"{VENV_BIN}/ray", "get-auth-token", "--generate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    head = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8",
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
        yield RayHead(url, env, head.pid)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:  # Ray's own shutdown then waits ~30 s on its agents; nothing of a test's is left to save
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        deadline = time.time() + 30  # until the killed processes are reaped
        while RayHead(url, env, head.pid).processes() and time.time() < deadline:
            time.sleep(0.5)
