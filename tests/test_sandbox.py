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

import pytest

from rdistill.config import SandboxConfig
from rdistill.scoring.sandbox import have_bwrap, run_program

# Tight limits keep the suite fast on a loaded 2-core machine; wall time leaves room for load.
CFG = SandboxConfig(timeout_s=8.0, cpu_s=2, memory_mb=256, max_procs=16, max_output_bytes=4096)


@pytest.fixture(scope="module")
def tmp_venv():
    """A venv where a fresh clone's lives when cloned into `mktemp -d`: under /tmp (which the
    sandbox replaces by its own), below a 0700 folder the sandbox's uid cannot enter."""
    import shutil
    import tempfile
    root = tempfile.mkdtemp()  # 0700, under /tmp, like mktemp -d
    assert oct(os.stat(root).st_mode & 0o777) == "0o700"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", f"{root}/clone/.venv"], check=True)
    yield f"{root}/clone/.venv/bin/python"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["own", "tmp_venv"])
def python(request):
    """Each containment test runs with this process's interpreter and with a venv in a 0700
    folder under /tmp: binding the interpreter in must not open anything else."""
    return None if request.param == "own" else request.getfixturevalue("tmp_venv")

def test_bwrap_is_installed_here():
    # CI installs bubblewrap (jobs/setup.sh); without it the stage degrades to rlimits only.
    assert have_bwrap()


def test_ok_program_with_stdin_and_output(python):
    r = run_program("import sys\nprint(sys.stdin.read().strip()[::-1])", "abc", CFG, python=python)
    assert (r.status, r.exit_code, r.stdout, r.isolation) == ("ok", 0, "cba\n", "bwrap")


def test_infinite_loop_is_stopped(python):
    t0 = time.monotonic()
    cfg = SandboxConfig(timeout_s=8.0, cpu_s=1)
    r = run_program("while True:\n    pass\n", None, cfg, python=python)
    assert r.status in ("timeout", "busy") and (r.detail in ("CPU-time limit", "wall-clock limit") or r.infra)
    # on a busy machine the wall-clock limit doubles on each retry; it still ends
    assert time.monotonic() - t0 < cfg.timeout_s * (2 ** (cfg.busy_retries + 1) - 1) + 5


def test_sleeping_program_hits_the_wall_clock():
    r = run_program("import time\ntime.sleep(60)", None, SandboxConfig(timeout_s=1.0))
    assert (r.status, r.detail) == ("timeout", "wall-clock limit") and r.wall_s < 5


def test_huge_allocation_is_refused(python):
    r = run_program("x = bytearray(8 * 1024**3)\nprint('allocated')", None, CFG, python=python)
    assert r.status == "memory" and "allocated" not in r.stdout


def test_fork_bomb_is_contained(python):
    bomb = ("import os, time\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        print('fork refused', flush=True)\n        time.sleep(0.05)\n")
    r = run_program(bomb, None, SandboxConfig(timeout_s=3.0, cpu_s=2, max_procs=16), python=python)
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


def test_network_is_unreachable(python):
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
    r = run_program(prog, None, CFG, python=python)
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


def test_parent_environment_is_not_readable(monkeypatch, python):
    monkeypatch.setenv("RDISTILL_TEST_SECRET", "hunter2-secret")
    prog = ("import os, glob\nprint(dict(os.environ))\n"
            "for p in glob.glob('/proc/*/environ'):\n"
            "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(p, e)\n")
    r = run_program(prog, None, CFG, python=python)
    assert "hunter2-secret" not in r.stdout + r.stderr
    assert "PATH" in r.stdout  # the program did run and print its own environment


def test_other_processes_cannot_be_killed(python):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prog = (f"import os, signal\nfor pid in ({os.getpid()}, {victim.pid}):\n"
                "    try:\n        os.kill(pid, signal.SIGKILL); print('killed', pid)\n"
                "    except OSError as e:\n        print('refused', pid, e.errno)\n"
                "os.kill(-1, signal.SIGKILL)\n")
        r = run_program(prog, None, CFG, python=python)
        assert r.status in ("killed", "error", "ok")
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


def test_output_is_truncated(python):
    r = run_program("import sys\nfor _ in range(10000):\n    sys.stdout.write('x' * 100)\n", None, CFG, python=python)
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
    out = subprocess.run([sys.executable, "-m", "rdistill.scoring.sandbox", str(prog), "--stdin", str(inp)],
                         capture_output=True, text=True, timeout=60)
    d = json.loads(out.stdout)
    assert (d["status"], d["exit_code"], d["stdout"]) == ("error", 3, "42\n")
    assert {"wall_s", "stderr", "stdout_truncated", "isolation"} <= d.keys()


def test_interpreter_below_a_closed_folder_outside_tmp_and_through_a_symlink():
    """A venv below a 0700 folder that is not under a path the sandbox hides (the folder is
    replaced by an empty tmpfs with the venv bound in), reached directly and through a symlink."""
    import shutil
    import tempfile
    root = tempfile.mkdtemp(dir="/var/tmp")  # 0700, not under /tmp
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", f"{root}/p/.venv"], check=True)
        link = f"{root}-link"
        os.symlink(f"{root}/p", link)
        for py in (f"{root}/p/.venv/bin/python", f"{link}/.venv/bin/python"):
            r = run_program(f"import os, sys\nprint(sys.prefix)\nprint(os.listdir({root!r}))\n"
                            f"open({root + '/p/x'!r}, 'w')", None, CFG, python=py)
            assert r.status == "error" and r.stdout.splitlines() == [f"{root}/p/.venv", "['p']"], r
            assert "Read-only" in r.stderr or "denied" in r.stderr  # the bound venv's folder is read-only
        os.unlink(link)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_self_check_passes_here_and_names_a_broken_interpreter(tmp_venv):
    from rdistill.scoring.sandbox_check import SandboxUnavailable, check_sandbox
    assert check_sandbox(CFG)["isolation"] == "bwrap"
    assert check_sandbox(SandboxConfig(python=tmp_venv))["python"] == tmp_venv
    with pytest.raises(SandboxUnavailable, match="/nonexistent/python does not exist"):
        check_sandbox(SandboxConfig(python="/nonexistent/python"))


def test_self_check_catches_an_interpreter_that_loses_its_venv():
    """A venv folder closed to other users still lets the binary start, but without its venv:
    the check says which folder and how to fix it."""
    import shutil
    import tempfile
    from rdistill.scoring.sandbox_check import SandboxUnavailable, check_sandbox
    root = tempfile.mkdtemp(dir="/var/tmp")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", f"{root}/.venv"], check=True)
        os.chmod(f"{root}/.venv", 0o700)
        if os.geteuid() == 0:
            with pytest.raises(SandboxUnavailable, match=r"closed to other users .*chmod o\+rx"):
                check_sandbox(SandboxConfig(python=f"{root}/.venv/bin/python"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Programs whose verdicts must not depend on how busy the machine is.
VERDICT_PROGRAMS = {
    "prints": "print(sum(range(10)))",
    "asserts": "assert sum(range(10)) == 46",
    # about 0.4 s of CPU: on a quarter of a core it needs ~1.6 s, more than the 1 s limit
    "computes": "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4:\n    pass\nprint('done')",
    "loops": "while True:\n    pass",
    "sleeps": "import time\ntime.sleep(30)",
}
TIGHT = SandboxConfig(timeout_s=1.0, cpu_s=1, memory_mb=256, max_output_bytes=4096)


def _verdicts(cfg):
    out = {}
    for name, src in VERDICT_PROGRAMS.items():
        r = run_program(src, None, cfg)
        out[name] = "infra" if r.infra else r.status
    return out


def test_a_busy_machine_does_not_turn_right_answers_wrong():
    """All of this process's work (and so every sandboxed program) pinned to one core shared
    with three busy loops: each program gets a quarter of a core. The verdicts equal those on
    an idle core; without retries, the starved program is an infrastructure failure, not wrong."""
    idle = _verdicts(TIGHT)
    assert idle == {"prints": "ok", "asserts": "error", "computes": "ok", "loops": "timeout", "sleeps": "timeout"}
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mask)})
    # each in a session of its own: the scheduler shares a core between sessions (autogroups)
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(3)]
    try:
        time.sleep(0.5)
        assert _verdicts(TIGHT) == idle
        r = run_program(VERDICT_PROGRAMS["computes"], None, SandboxConfig(**{**TIGHT.__dict__, "busy_retries": 0}))
        assert (r.status, r.infra) == ("busy", True) and r.cpu_s < 1 and r.queue_wait_s > 0.25, r
        from rdistill.scoring.verifiers import score
        v = score("code", "<think>x</think>\n```python\n" + VERDICT_PROGRAMS["computes"] + "\n```",
                  {"tests": "assert True"}, SandboxConfig(**{**TIGHT.__dict__, "busy_retries": 0}))
        assert v.infra and not v.correct and v.reason.startswith("busy")
    finally:
        for p in load:
            p.kill()
            p.wait()
        os.sched_setaffinity(0, mask)
