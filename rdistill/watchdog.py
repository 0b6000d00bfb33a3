"""Processes die with the run that started them, even when the run is killed with SIGKILL.

vLLM's engine core and its workers are grandchildren of a Ray worker: when a run's whole
process group is SIGKILLed, Ray's own processes go, but an EngineCore that was reparented to
init keeps running (seen here: 17+ minutes, 2.5 GB each; on a GPU it keeps the GPU's memory).
So `watch_run` starts a small watchdog in a session of its own (a group kill does not reach it)
that keeps a list of every process descended from the run's driver. When the driver ends, for
whatever reason, the watchdog waits a short grace period and then stops what is left of that
list (SIGTERM, then SIGKILL), matching each pid with its start time so that a recycled pid is
never touched. The list is also kept on disk (<run_dir>/.work/owners/<pid>.json), so a later
run on the same run directory reports anything an earlier one left behind.

    python -m rdistill.watchdog --owner PID --state FILE     (started by watch_run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from rdistill.log import log

POLL_S = 0.5
GRACE_S = 3.0


def _stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, start time in clock ticks) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[1]), int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def _alive(pid: int, start: int) -> bool:
    s = _stat(pid)
    return s is not None and s[1] == start


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live process below `root`."""
    kids: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            s = _stat(int(p))
            if s:
                kids.setdefault(s[0], []).append(int(p))
                starts[int(p)] = s[1]
    out, todo = {}, list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in starts and pid not in out:
            out[pid] = starts[pid]
            todo += kids.get(pid, [])
    return out


def leftovers(run_dir: str | Path) -> list[dict]:
    """Processes an earlier, dead run on this run directory left running: [{pid, cmd, owner}].
    State files whose processes are all gone are removed."""
    out = []
    for f in sorted((Path(run_dir) / ".work" / "owners").glob("*.json")):
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if _alive(st["owner"], st["owner_start"]):
            continue  # a run still going (a second driver on the same run dir)
        alive = [{"pid": p["pid"], "cmd": p["cmd"], "owner": st["owner"]} for p in st["processes"]
                 if _alive(p["pid"], p["start"])]
        if alive:
            out += alive
        else:
            f.unlink(missing_ok=True)
    return out


@contextmanager
def watch_run(run_dir: str | Path, remove: Sequence[str] = ()) -> Iterator[None]:
    """Report what earlier runs left running, and have a watchdog stop this run's processes
    when it ends (normally, by an error, or by SIGKILL), then delete the `remove` folders."""
    left = leftovers(run_dir)
    if left:
        log.warning("an earlier run on %s left %d process(es) running: %s; stop them (kill PID) before "
                    "they hold memory or GPUs", run_dir, len(left),
                    ", ".join(f"pid {p['pid']} ({p['cmd'][:40]})" for p in left[:6]))
    state = Path(run_dir).absolute() / ".work" / "owners" / f"{os.getpid()}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    dog = subprocess.Popen([sys.executable, "-m", "rdistill.watchdog", "--owner", str(os.getpid()),
                            "--state", str(state), *[a for r in remove for a in ("--remove", str(r))]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    dog.stdout.readline()  # "ready": it watches from here on
    try:
        yield
    finally:
        try:  # a normal end: hand over what runs now (the dog polls twice a second), then go
            dog.stdin.write((json.dumps({str(p): s for p, s in descendants(os.getpid()).items()
                                         if p != dog.pid}) + "\n").encode())
            dog.stdin.close()
        except OSError:
            pass


def _stop(tracked: dict[int, int]) -> list[int]:
    """SIGTERM, then SIGKILL after a grace period, every tracked process still alive."""
    alive = [p for p, s in tracked.items() if _alive(p, s)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.time() + GRACE_S
        while time.time() < deadline and any(_alive(p, tracked[p]) for p in alive):
            time.sleep(0.1)
        alive = [p for p in alive if _alive(p, tracked[p])]
    return alive


def _watch(owner: int, state: Path, remove: Sequence[str] = ()) -> None:
    import select
    owner_start = _stat(owner)[1]
    me = os.getpid()
    print("ready", flush=True)
    tracked: dict[int, int] = {}
    cmds: dict[int, str] = {}
    written = None
    while _alive(owner, owner_start):
        for pid, start in descendants(owner).items():
            if pid != me and tracked.get(pid) != start:
                tracked[pid], cmds[pid] = start, _cmd(pid)
        live = sorted(p for p, s in tracked.items() if _alive(p, s))
        if live != written:
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"owner": owner, "owner_start": owner_start, "processes": [
                {"pid": p, "start": tracked[p], "cmd": cmds[p]} for p in live]}))
            os.replace(tmp, state)
            written = live
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready:  # the owner's last word (a normal end) or EOF (it died)
            line = sys.stdin.buffer.readline()
            for pid, start in (json.loads(line) if line.strip() else {}).items():
                if int(pid) != me:
                    tracked[int(pid)], cmds[int(pid)] = start, _cmd(int(pid))
            break
    time.sleep(GRACE_S)  # Ray's own shutdown gets the first chance
    stuck = _stop(tracked)
    if not stuck:
        state.unlink(missing_ok=True)
        for r in remove:  # nothing of the run is left to use them
            shutil.rmtree(r, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="stop a run's processes when the run ends")
    p.add_argument("--owner", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--remove", action="append", default=[], help="a folder to delete once the run's processes are gone")
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the run, not for us
    if _stat(a.owner):
        _watch(a.owner, Path(a.state), a.remove)
    else:
        print("ready", flush=True)  # nothing to watch: the owner is already gone
        for r in a.remove:
            shutil.rmtree(r, ignore_errors=True)


if __name__ == "__main__":
    main()
