"""Run one untrusted Python program under hard limits and report what happened.

Isolation (in order of preference):
- bubblewrap: a fresh mount namespace with a read-only root, a private size-limited /tmp, no
  network, its own pid/ipc/uts namespaces, /root, /home and /run hidden, a cleared environment,
  and death with the parent. As root (these machines run everything as root) bwrap runs
  privileged and drops to a fresh unprivileged uid inside with `setpriv`: the kernel does not
  enforce RLIMIT_NPROC for root, so only an unprivileged uid contains a fork bomb. A fresh uid per
  program means concurrent sandboxes neither share a process count nor can signal each other.
  (Privileged bwrap, not the reverse order, so that an interpreter under a 0700 /root still runs.)
- without bwrap: rlimits only (plus the uid drop as root), with a loud warning.
Inside, a small launcher sets CPU-time, address-space, process-count, file-size and core rlimits,
then runs the program as `__main__`. Output is read through pipes and cut at a byte limit.

CLI, for debugging one sample under the same limits:
    python -m rdistill.scoring.sandbox PROGRAM.py [--stdin FILE] [--timeout-s 5] [--memory-mb 512]
prints one JSON object: status (ok | error | timeout | memory | killed | sandbox_error),
exit_code, signal, stdout, stderr (truncated), truncated flags, wall_s, isolation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

from rdistill.config import SandboxConfig
from rdistill.scoring.sandbox_mounts import Mounts, mounts_for

log = logging.getLogger("rdistill")

# Paths hidden from programs (tmpfs over them); the interpreter's own folders are bound back.
HIDDEN = ["/root", "/home", "/run"]
BOX = "/tmp/.box"  # where the program and launcher appear inside the sandbox
UID_RANGE = (1_000_000, 2_000_000_000)
_warned = False

LAUNCHER = r'''
import json, resource, runpy, sys
lim = json.loads(sys.argv[1])
def cap(what, n):
    resource.setrlimit(what, (n, n))
resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))  # SIGXCPU, then SIGKILL
cap(resource.RLIMIT_AS, lim["memory_mb"] << 20)
if lim["nproc"]:
    cap(resource.RLIMIT_NPROC, lim["nproc"])
cap(resource.RLIMIT_FSIZE, lim["fsize"])
cap(resource.RLIMIT_CORE, 0)
del json, resource, lim, cap
sys.argv = [sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass
class SandboxResult:
    status: str
    """ok | error (non-zero exit) | timeout (wall or CPU limit) | memory | killed (a signal) |
    busy (the machine, not the program: it kept waiting for CPU until the wall-clock limit, on
    every retry) | sandbox_error (the sandbox itself could not start)."""
    exit_code: Optional[int]
    signal: Optional[int]
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    wall_s: float
    isolation: str
    """bwrap | rlimits (the fallback without bubblewrap)."""
    detail: str = ""
    """Why, in a few words: the exception's last line, which limit was hit."""
    uid: Optional[int] = None
    """The private uid the program ran as (None when not started as root)."""
    cpu_s: Optional[float] = None
    """CPU seconds the program used (measured at a wall-clock timeout)."""
    queue_wait_s: Optional[float] = None
    """Seconds it was ready to run but waited for a CPU (measured at a wall-clock timeout)."""
    attempts: int = 1
    """Runs it took: more than 1 when a busy machine made it miss the wall-clock limit."""

    @property
    def infra(self) -> bool:
        """The verdict says nothing about the program: the sandbox or the machine failed."""
        return self.status in ("busy", "sandbox_error")

    def to_dict(self) -> dict:
        return asdict(self)


def have_bwrap() -> bool:
    return shutil.which("bwrap") is not None


def _bwrap_argv(cfg: SandboxConfig, mounts: Mounts, uid: Optional[int]) -> list[str]:
    size = str(max(cfg.memory_mb, 16) << 20)
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm"]
    for h in HIDDEN:
        if os.path.isdir(h):
            argv += ["--perms", "0755", "--tmpfs", h]
    for m in mounts.tmpfs:  # folders the sandbox uid cannot enter: empty, with the needed ones bound in
        argv += ["--perms", "0755", "--tmpfs", m]
    for d in mounts.parents:  # bwrap would create them with the host folder's mode (0700 for mktemp -d)
        argv += ["--perms", "0755", "--dir", d]
    for p in mounts.binds:
        argv += ["--ro-bind", p, p]
    argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv",
             "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
             "--setenv", "LANG", "C.UTF-8", "--chdir", "/tmp"]
    if uid is None:  # not root: bwrap makes an unprivileged user namespace itself
        return argv + ["--unshare-user", "--"]
    return argv + ["--cap-add", "CAP_SETUID,CAP_SETGID", "--", *_setpriv(uid)]


def _setpriv(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _reader(stream, limit: int, out: list) -> None:
    """Keep the first `limit` bytes, drain the rest so the program never blocks on a full pipe."""
    kept, total = bytearray(), 0
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[:limit - len(kept)]
    out.extend([bytes(kept), total > limit])


def _program_usage(root: int) -> tuple[Optional[float], float]:
    """(CPU seconds, run-queue wait seconds) of the program's own process, the shallowest process
    below `root` running the launcher: what it used, and how long it was ready to run while the
    machine gave the CPU to others. Only that process: a program's own busy children would
    otherwise count as a busy machine."""
    kids: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(pid))
            except (OSError, IndexError, ValueError):
                pass
    level = [root]
    while level:
        for pid in level:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                if argv[0].endswith((b"bwrap", b"setpriv")) or not any(a.endswith(b"_launch.py") for a in argv):
                    continue  # bwrap and setpriv carry the launcher in their arguments too
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/schedstat") as f:
                    wait = int(f.read().split()[1]) / 1e9
                # utime, stime, cutime, cstime: fields 14-17 of stat (11-14 after the name)
                return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK"), wait
            except (OSError, IndexError, ValueError):
                continue
        level = [k for pid in level for k in kids.get(pid, [])]
    return None, 0.0


def _kill_uid(uid: int) -> None:
    """Backstop: SIGKILL whatever still runs under this program's private uid."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            if str(uid) in uids:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, StopIteration):
            pass


def _classify(code: Optional[int], timed_out: bool, stderr: str) -> tuple[str, Optional[int], str]:
    """(status, signal, detail) from the exit code (bwrap reports a child killed by signal N as
    128 + N; Popen reports -N when bwrap itself was killed)."""
    sig = -code if code is not None and code < 0 else (code - 128 if code and code > 128 else None)
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    if timed_out:
        return "timeout", sig, "wall-clock limit"
    if sig == signal.SIGXCPU:
        return "timeout", sig, "CPU-time limit"
    if "MemoryError" in last or "Cannot allocate memory" in last:
        return "memory", sig, "memory limit"
    if code == 0:
        return "ok", None, ""
    if sig is not None:
        return "killed", sig, f"killed by signal {signal.Signals(sig).name}" if sig in signal.valid_signals() else f"signal {sig}"
    if last.startswith("bwrap:") or last.startswith("setpriv:"):
        return "sandbox_error", None, last[:200]
    return "error", None, last[:200]


def run_program(source: str, stdin: str | bytes | None = None, cfg: Optional[SandboxConfig] = None,
                python: Optional[str] = None, use_bwrap: Optional[bool] = None) -> SandboxResult:
    """Run `source` as a Python program under the sandbox limits; never raises for the program's
    misbehaviour (that is the result), only for a broken host setup.

    A wall-clock timeout is the program's fault when it was idle (sleeping, blocked) or had used
    its CPU; when it spent the time waiting in the run queue of a busy machine, it is rerun with
    twice the wall time, up to `busy_retries` times, then reported as `busy` (infrastructure)."""
    cfg = cfg or SandboxConfig()
    res = None
    for attempt in range(cfg.busy_retries + 1):
        res = _run_once(source, stdin, cfg, python, use_bwrap, cfg.timeout_s * 2 ** attempt)
        res.attempts = attempt + 1
        if not (res.status == "timeout" and res.detail.startswith("wall-clock") and _starved(res, cfg)):
            return res
        log.info("sandbox: wall-clock limit after %.1fs with %.2fs CPU, the rest waiting for a busy "
                 "machine; retrying with %.0fs", res.wall_s, res.cpu_s or 0.0, cfg.timeout_s * 2 ** (attempt + 1))
    res.status = "busy"
    res.detail = (f"the machine was too busy: wall-clock limit on {res.attempts} tries, the last after "
                  f"{res.wall_s:.1f}s with only {res.cpu_s or 0:.2f}s CPU")
    return res


def _starved(res: SandboxResult, cfg: SandboxConfig) -> bool:
    """At a wall-clock timeout: did the program want CPU it did not get? Not idle (sleeping or
    blocked on its own), short of its CPU limit, and a good share of the time in the run queue."""
    wait, cpu = res.queue_wait_s or 0.0, res.cpu_s or 0.0
    return cpu < 0.9 * cfg.cpu_s and cpu + wait >= 0.5 * res.wall_s and wait >= 0.25 * res.wall_s


def _run_once(source: str, stdin, cfg: SandboxConfig, python: Optional[str], use_bwrap: Optional[bool],
              timeout_s: float) -> SandboxResult:
    global _warned
    python = python or cfg.python or sys.executable
    use_bwrap = have_bwrap() if use_bwrap is None else use_bwrap
    is_root = os.geteuid() == 0
    uid = random.SystemRandom().randrange(*UID_RANGE) if is_root and shutil.which("setpriv") else None
    if not use_bwrap and not _warned:
        _warned = True
        log.warning("SANDBOX WITHOUT BUBBLEWRAP: untrusted code runs with rlimits only (no "
                    "filesystem, network or pid isolation). Install bubblewrap (apt-get install "
                    "bubblewrap) before running code from an untrusted teacher.")
    limits = {"cpu_s": int(cfg.cpu_s), "memory_mb": int(cfg.memory_mb), "fsize": int(cfg.memory_mb) << 20,
              "nproc": int(cfg.max_procs) if (uid is not None or use_bwrap) else 0}
    host = tempfile.mkdtemp(prefix="rdistill-box-")
    try:
        os.chmod(host, 0o755)
        for name, text in (("main.py", source), ("_launch.py", LAUNCHER)):
            with open(os.path.join(host, name), "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(os.path.join(host, name), 0o644)
        inner = BOX if use_bwrap else host
        if use_bwrap:
            mounts = mounts_for(python, uid is not None)
            cmd = [mounts.exe, "-I", "-B", f"{inner}/_launch.py", json.dumps(limits), f"{inner}/main.py"]
            argv = _bwrap_argv(cfg, mounts, uid)
            argv[argv.index("--chdir"):argv.index("--chdir")] = ["--ro-bind", host, BOX]
            cmd = argv + cmd
        else:
            cmd = [python, "-I", "-B", f"{inner}/_launch.py", json.dumps(limits), f"{inner}/main.py"]
            if uid is not None:
                cmd = _setpriv(uid) + cmd
        env = None if use_bwrap else {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": host, "LANG": "C.UTF-8"}
        data = stdin.encode() if isinstance(stdin, str) else stdin
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                cwd=host, start_new_session=True)
        outs: list = []
        errs: list = []
        threads = [threading.Thread(target=_reader, args=(proc.stdout, cfg.max_output_bytes, outs), daemon=True),
                   threading.Thread(target=_reader, args=(proc.stderr, cfg.max_output_bytes, errs), daemon=True)]
        for t in threads:
            t.start()
        if data is not None:
            threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True).start()
        timed_out, cpu, wait = False, None, 0.0
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            cpu, wait = _program_usage(proc.pid)  # before the kill: what it used, what it waited
            _killpg(proc.pid)
            code = proc.wait()
        wall = time.monotonic() - t0
        if uid is not None:
            _kill_uid(uid)  # bwrap's pid namespace already took them; needed without bwrap
        elif not use_bwrap:
            _killpg(proc.pid)  # leftovers of the group (its id stays taken while it has members)
        for t in threads:
            t.join(timeout=2)
        out, out_cut = (outs or [b"", False])[:2]
        err, err_cut = (errs or [b"", False])[:2]
        stderr = err.decode("utf-8", "replace")
        status, sig, detail = _classify(code, timed_out, stderr)
        res = SandboxResult(status, code, sig, out.decode("utf-8", "replace"), stderr, out_cut,
                            err_cut, round(wall, 4), "bwrap" if use_bwrap else "rlimits", detail, uid,
                            None if cpu is None else round(cpu, 3), round(wait, 3) if timed_out else None)
        return res
    finally:
        shutil.rmtree(host, ignore_errors=True)


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except OSError:  # the program exited without reading its input
        pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.scoring.sandbox",
                                description="Run one Python program in the code sandbox; print a JSON result.")
    p.add_argument("program", help="Python source file to run")
    p.add_argument("--stdin", help="file fed to the program's standard input")
    d = SandboxConfig()
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    p.add_argument("--cpu-s", type=int, default=d.cpu_s)
    p.add_argument("--memory-mb", type=int, default=d.memory_mb)
    p.add_argument("--max-procs", type=int, default=d.max_procs)
    p.add_argument("--max-output-bytes", type=int, default=d.max_output_bytes)
    a = p.parse_args(argv)
    try:
        with open(a.program, encoding="utf-8") as f:
            source = f.read()
        stdin = open(a.stdin, "rb").read() if a.stdin else None
    except OSError as e:
        print(f"error: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    cfg = SandboxConfig(timeout_s=a.timeout_s, cpu_s=a.cpu_s, memory_mb=a.memory_mb,
                        max_procs=a.max_procs, max_output_bytes=a.max_output_bytes)
    print(json.dumps(run_program(source, stdin, cfg).to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
