"""Peak memory of a command's process tree, measured the same way for any program: the sum of
anonymous resident memory (RssAnon: heap, tensors, thread stacks; not file-backed pages such as
mmapped inputs or the page cache, which the kernel can drop) over the process and all its
descendants, sampled every few milliseconds. Also the kernel's ru_maxrss of the command, which
counts mmapped file pages and, on Linux, starts from the high-water mark of the process that
forked it: meaningful only when that parent is small."""

from __future__ import annotations

import os
import subprocess
import threading
import time


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_anon_bytes(pid: int) -> int:
    """RssAnon of pid and every descendant, summed, in bytes."""
    return sum(_anon_kb(p) for p in _tree(pid)) * 1024


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.003, cwd: str | None = None) -> dict:
    """Run cmd to completion: {"rc", "wall_s", "peak_anon_bytes", "maxrss_bytes", "stderr"}."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_anon_bytes(proc.pid))
            time.sleep(interval)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    done.set()
    th.join()
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "peak_anon_bytes": peak[0],
            "maxrss_bytes": usage.ru_maxrss * 1024, "stderr": err.decode(errors="replace")}
