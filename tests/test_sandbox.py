"""The code sandbox against hostile programs: each is reported as failed with its reason, and the
host (this test process, its files, its environment, its other processes) stays unharmed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from rdistill.config import SandboxConfig
from rdistill.verify.sandbox import have_bwrap, run_program

# Tight limits keep the suite fast on a loaded 2-core machine; wall time leaves room for load.
CFG = SandboxConfig(timeout_s=8.0, cpu_s=2, memory_mb=256, max_procs=16, max_output_bytes=4096)

def test_bwrap_is_installed_here():
    # CI installs bubblewrap (jobs/setup.sh); without it the stage degrades to rlimits only.
    assert have_bwrap()


def test_ok_program_with_stdin_and_output():
    r = run_program("import sys\nprint(sys.stdin.read().strip()[::-1])", "abc", CFG)
    assert (r.status, r.exit_code, r.stdout, r.isolation) == ("ok", 0, "cba\n", "bwrap")


def test_infinite_loop_is_stopped():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", None, SandboxConfig(timeout_s=8.0, cpu_s=1))
    assert r.status == "timeout" and r.detail in ("CPU-time limit", "wall-clock limit")
    assert time.monotonic() - t0 < CFG.timeout_s + 5


def test_sleeping_program_hits_the_wall_clock():
    r = run_program("import time\ntime.sleep(60)", None, SandboxConfig(timeout_s=1.0))
    assert (r.status, r.detail) == ("timeout", "wall-clock limit") and r.wall_s < 5


def test_huge_allocation_is_refused():
    r = run_program("x = bytearray(8 * 1024**3)\nprint('allocated')", None, CFG)
    assert r.status == "memory" and "allocated" not in r.stdout


def test_fork_bomb_is_contained():
    bomb = ("import os, time\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        print('fork refused', flush=True)\n        time.sleep(0.05)\n")
    r = run_program(bomb, None, SandboxConfig(timeout_s=3.0, cpu_s=2, max_procs=16))
    assert r.status in ("timeout", "error") and "fork refused" in r.stdout
    # the process limit held: far fewer than a fork bomb's thousands of processes ever existed,
    # none of them is left, and the host can still start processes
    time.sleep(0.5)
    if r.uid is not None:
        assert [p for p in os.listdir("/proc") if p.isdigit() and _uid(int(p)) == r.uid] == []
    assert subprocess.run(["true"]).returncode == 0


def _uid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("Uid:")).split()[1])
    except (OSError, StopIteration):
        return -1


def test_write_outside_tmp_fails_and_tmp_is_private(tmp_path):
    target = tmp_path / "pwned.txt"
    prog = (f"open('/tmp/inside.txt', 'w').write('x')\n"
            f"open({str(target)!r}, 'w').write('owned')\n")
    r = run_program(prog, None, CFG)
    assert r.status == "error" and ("Read-only" in r.stderr or "denied" in r.stderr or "No such" in r.stderr)
    assert not target.exists() and not os.path.exists("/tmp/inside.txt")


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    got, done = [], threading.Event()
    server.settimeout(0.2)
    t = threading.Thread(target=lambda: _accept(server, got, done), daemon=True)
    t.start()
    prog = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'stolen')\nprint('connected')\n")
    r = run_program(prog, None, CFG)
    done.set()
    t.join()
    server.close()
    assert r.status == "error" and "connected" not in r.stdout and got == []


def _accept(server, got, done):
    while not done.is_set():
        try:
            conn, _ = server.accept()
            got.append(conn.recv(100))
        except OSError:  # timeout: look again until the program has finished
            pass


def test_parent_environment_is_not_readable(monkeypatch):
    monkeypatch.setenv("RDISTILL_TEST_SECRET", "hunter2-secret")
    prog = ("import os, glob\nprint(dict(os.environ))\n"
            "for p in glob.glob('/proc/*/environ'):\n"
            "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(p, e)\n")
    r = run_program(prog, None, CFG)
    assert "hunter2-secret" not in r.stdout + r.stderr
    assert "PATH" in r.stdout  # the program did run and print its own environment


def test_other_processes_cannot_be_killed():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prog = (f"import os, signal\nfor pid in ({os.getpid()}, {victim.pid}):\n"
                "    try:\n        os.kill(pid, signal.SIGKILL); print('killed', pid)\n"
                "    except OSError as e:\n        print('refused', pid, e.errno)\n"
                "os.kill(-1, signal.SIGKILL)\n")
        r = run_program(prog, None, CFG)
        assert r.status in ("killed", "error", "ok")
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


def test_output_is_truncated():
    r = run_program("import sys\nfor _ in range(10000):\n    sys.stdout.write('x' * 100)\n", None, CFG)
    assert r.status == "ok" and r.stdout_truncated and len(r.stdout) == CFG.max_output_bytes


def test_fallback_without_bwrap_still_limits():
    r = run_program("import os\nprint(os.getuid(), flush=True)\nwhile True:\n    pass\n", None,
                    SandboxConfig(timeout_s=6.0, cpu_s=1), use_bwrap=False)
    assert r.isolation == "rlimits" and r.status == "timeout"
    if os.geteuid() == 0:  # dropped to a private unprivileged uid even without bwrap
        assert int(r.stdout.split()[0]) >= 1_000_000


def test_cli_prints_one_json_object(tmp_path):
    prog, inp = tmp_path / "p.py", tmp_path / "in.txt"
    prog.write_text("print(int(input()) * 2)\nraise SystemExit(3)\n")
    inp.write_text("21\n")
    out = subprocess.run([sys.executable, "-m", "rdistill.verify.sandbox", str(prog), "--stdin", str(inp)],
                         capture_output=True, text=True, timeout=60)
    d = json.loads(out.stdout)
    assert (d["status"], d["exit_code"], d["stdout"]) == ("error", 3, "42\n")
    assert {"wall_s", "stderr", "stdout_truncated", "isolation"} <= d.keys()
