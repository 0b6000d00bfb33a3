"""A run's processes die with it, even when the run is SIGKILLed: the watchdog stops what the
driver started (an engine in a session of its own included), and a later run on the same run
directory reports what an earlier one left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from rdistill.watchdog import _stat, descendants, leftovers

OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from rdistill.watchdog import watch_run
    with watch_run(sys.argv[1], remove=[sys.argv[3]]):  # e.g. the run's vLLM socket folder
        # a session of its own, like a Ray worker's engine: a group kill does not reach it
        p = subprocess.Popen(["sleep", "300"], start_new_session=True)
        print(p.pid, flush=True)
        if sys.argv[2] == "hang":
            time.sleep(300)
""")


def _gone(pid: int, start: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        s = _stat(pid)
        if s is None or s[1] != start:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("how", ["sigkill", "normal"])
def test_processes_die_with_their_run(tmp_path, how):
    ipc = tmp_path / "ipc"
    ipc.mkdir()
    (ipc / "left-by-an-engine").write_text("")
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), "hang" if how == "sigkill" else "exit", str(ipc)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    child = int(owner.stdout.readline())
    start = _stat(child)[1]
    state = tmp_path / ".work" / "owners" / f"{owner.pid}.json"
    if how == "sigkill":
        deadline = time.time() + 20
        while time.time() < deadline and not (state.exists() and child in
                                              [p["pid"] for p in json.loads(state.read_text())["processes"]]):
            time.sleep(0.2)
        os.killpg(owner.pid, signal.SIGKILL)  # the whole group, as a user's kill -9 -PGID
    owner.wait(timeout=30)
    try:
        assert _gone(child, start, within=20), "the run's process outlived it"
        assert _gone_file(state, within=10)
        assert _gone_file(ipc, within=10)  # the folders it was given, once nothing of the run is left
    finally:
        if _stat(child):
            os.kill(child, signal.SIGKILL)


def _gone_file(path: Path, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline and path.exists():
        time.sleep(0.2)
    return not path.exists()


def test_a_later_run_reports_what_an_earlier_one_left(tmp_path):
    dead = subprocess.Popen(["sleep", "0.2"])
    dead_start = _stat(dead.pid)[1]
    dead.wait()
    stray = subprocess.Popen(["sleep", "300"])
    try:
        owners = tmp_path / ".work" / "owners"
        owners.mkdir(parents=True)
        (owners / f"{dead.pid}.json").write_text(json.dumps({
            "owner": dead.pid, "owner_start": dead_start,
            "processes": [{"pid": stray.pid, "start": _stat(stray.pid)[1], "cmd": "VLLM::EngineCore"}]}))
        assert [p["pid"] for p in leftovers(tmp_path)] == [stray.pid]
        # a new run on the same run directory (in a process of its own: a watchdog stops its
        # owner's processes, which here would include this test session's)
        code = ("import sys\nfrom rdistill.log import setup\nfrom rdistill.watchdog import watch_run\nsetup()\n"
                "with watch_run(sys.argv[1]):\n    pass\n")
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        lines = [line for line in p.stderr.splitlines() if "left 1 process(es) running" in line]
        assert len(lines) == 1 and f"pid {stray.pid} (VLLM::EngineCore)" in lines[0], p.stderr
    finally:
        stray.kill()
        stray.wait()
    assert leftovers(tmp_path) == [] and not (owners / f"{dead.pid}.json").exists()


@pytest.mark.slow
def test_killed_generate_run_leaves_no_engine(tmp_path):
    """kill -9 of a generate run's whole process group once its vLLM engine is up: the engine
    core and everything else the run started are gone soon after."""
    run = subprocess.Popen([sys.executable, "jobs/run.py", f"run_dir={tmp_path}", "stages=[toy,generate]",
                            "toy.n_train=1500"], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    seen: dict[int, int] = {}
    engine = None
    deadline = time.time() + 300
    while time.time() < deadline and engine is None and run.poll() is None:
        for pid, start in descendants(run.pid).items():
            seen[pid] = start
            try:
                if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    engine = pid
            except OSError:
                pass
        time.sleep(0.5)
    assert engine is not None, "the generate stage never started a vLLM engine"
    # right after a block was committed: the engine is mid-run (killed while still loading, it
    # dies with its Ray worker; mid-run it did not, before the watchdog)
    ckpt = tmp_path / ".work" / "generate" / "ckpt"
    while time.time() < deadline and run.poll() is None and not (ckpt.exists() and any(ckpt.rglob("*.*"))):
        seen.update(descendants(run.pid))
        time.sleep(0.5)
    assert run.poll() is None, "the run ended before a block was committed"
    seen.update(descendants(run.pid))
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    left = [p for p, s in seen.items() if not _gone(p, s, within=30)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert left == [], f"left running after the kill: {left}"
