"""The console carries rdistill's lines; libraries' and Ray workers' output goes to the run log."""

from __future__ import annotations

import io
import logging

import pytest
import ray.data  # noqa: F401  (sets up its loggers once, as a run does before quiet_console)

from rdistill import log as rlog


@pytest.fixture
def run_log(capsys, tmp_path, monkeypatch):
    """A run log as the command line sets one up, undone afterwards (loggers are process-wide)."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    saved = {n: (lg.handlers[:], lg.propagate) for n, lg in logging.Logger.manager.loggerDict.items()
             if isinstance(lg, logging.Logger)}
    root_handlers = logging.getLogger().handlers[:]
    rlog_handlers = rlog.log.handlers[:]
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    monkeypatch.setattr(dispatcher, "handlers", dispatcher.handlers[:])
    monkeypatch.setattr(rlog, "_quiet", False)
    monkeypatch.setattr(rlog, "_log_file", None)
    monkeypatch.setattr(rlog, "_file_handler", None)
    path = rlog.log_to_file(str(tmp_path))
    console = io.StringIO()  # what rdistill's own console handler writes
    rlog.log.addHandler(logging.StreamHandler(console))
    yield tmp_path / "logs", path, console
    for n, (hs, prop) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:] = hs
        lg.propagate = prop
    logging.getLogger().handlers[:] = root_handlers
    rlog.log.handlers[:] = rlog_handlers
    logging.captureWarnings(False)


def test_library_loggers_go_to_the_run_log_not_the_console(run_log, capsys):
    logs, path, console = run_log
    chatty = logging.getLogger("some.library")
    chatty.addHandler(logging.StreamHandler())  # a library's own console handler (stderr)
    chatty.propagate = False
    rlog.quiet_console(verbose=False)
    chatty.warning("library chatter")
    rlog.log.info("our own line")
    assert "library chatter" not in capsys.readouterr().err and "our own line" in console.getvalue()
    text = open(path).read()
    assert "library chatter" in text and "our own line" in text
    # Ray and Ray Data were imported and lost their console handlers too
    for name in ("ray", "ray.data"):
        assert not [h for h in logging.getLogger(name).handlers if rlog._is_console(h)], name


def test_a_logger_without_handlers_does_not_reach_pythons_last_resort(run_log, capsys):
    """vLLM's loggers end up with no handler once quieted (or configure none): without a root
    handler Python's last resort printed their warnings bare on stderr ("Triton is installed...")."""
    logs, path, console = run_log
    logging.getLogger().handlers[:] = []
    rlog.quiet_console(verbose=False)
    bare = logging.getLogger("handlerless.library")
    assert not bare.handlers and bare.propagate
    bare.warning("no handler of its own")
    assert "no handler of its own" not in capsys.readouterr().err
    assert "no handler of its own" in open(path).read()


def test_verbose_keeps_the_full_stream(run_log, capsys):
    chatty = logging.getLogger("another.library")
    chatty.addHandler(logging.StreamHandler())
    chatty.propagate = False
    rlog.quiet_console(verbose=True)
    chatty.warning("library chatter")
    assert "library chatter" in capsys.readouterr().err


def test_ray_data_progress_block_becomes_one_line(run_log, capsys):
    console = run_log[2]
    rlog.quiet_console()
    lg = logging.getLogger("ray.data._internal.progress.logging_progress")
    block = ["======= Running Dataset: ds_1 =======", "Total Progress: 30/60 rows",
             "Active & requested resources: 2/8 CPU, 1.0MiB/3.5GiB object store", "",
             "- ReadJSON: 60/60", "  Tasks: 0; Actors: 0", "- Write: 30/60", "  Tasks: 1; Actors: 0", "=" * 38]
    for _ in range(2):  # the second block within 30 s says nothing
        for line in block:
            lg.info(line)
    out = console.getvalue() + capsys.readouterr().err
    lines = [l for l in out.splitlines() if "data:" in l]
    assert len(lines) == 1 and lines[0].endswith("data: Write 30/60"), out  # no rate before a second has passed
    assert "Running Dataset" not in out


def test_worker_output_goes_to_workers_log_and_errors_surface_once(run_log, capsys):
    logs, _, console = run_log
    rlog.quiet_console()
    rlog.capture_worker_output()
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    import ray._private.worker as ray_worker
    dispatcher.emit({"lines": ["INFO loading weights", "ERROR engine failed to start", "ERROR more detail"],
                     "pid": 42, "is_err": True, "actor_name": "WarmEngine"})
    dispatcher.emit({"lines": ["UserWarning: resource_tracker: process died unexpectedly, relaunching."],
                     "pid": 44, "is_err": True, "actor_name": "Engine"})  # a warning, not an error
    dispatcher.emit({"lines": ["Exception in thread Monitor:", "Traceback (most recent call last):",
                               '  File "t.py", line 3, in run', "    self.go()", "RuntimeError: state API down"],
                     "pid": 43, "is_err": True, "actor_name": "Cleaner"})
    ray_worker.print_to_stdstream({"lines": ["Task f failed. It will be retried. Error: Traceback (most recent "
                                             "call last):\n  File 'x.py', line 1\nValueError: no"],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    err = console.getvalue() + capsys.readouterr().err
    surfaced = [l for l in err.splitlines() if l.startswith("worker ")]
    assert len(surfaced) == 3, err  # one per process and minute: pid 42, pid 43 and the raylet once each
    assert "WarmEngine: ERROR engine failed to start" in surfaced[0] and "retried" in surfaced[2]
    assert "Cleaner: RuntimeError: state API down" in surfaced[1]
    assert "INFO loading weights" not in err and "Traceback" not in err and "x.py" not in err
    text = (logs / "workers.log").read_text()
    assert "resource_tracker" not in err
    for line in ("INFO loading weights", "ERROR more detail", "It will be retried", "resource_tracker"):
        assert line in text


def test_train_progress_line_reads_each_jobs_last_step(tmp_path):
    import json

    from rdistill.train.progress import TrainProgress
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3))
                                         + '{"step": 4, "lo')  # a line still being written
    line = TrainProgress({"code": (tmp_path / "code.jsonl", 10), "math": (tmp_path / "none.jsonl", 20)}).line()
    assert line.startswith("train: code 3/10 loss 0.333; math 0/20 (3/30 steps")


def test_native_stderr_goes_to_the_run_log_and_python_keeps_the_console(tmp_path):
    """What native code writes to descriptor 2 (Ray's C++ core worker) lands in logs/native.log;
    rdistill's lines and Python's stderr still reach the terminal; restoring undoes it."""
    import subprocess
    import sys
    code = f"""
import os, sys
from rdistill import log as rlog
lg = rlog.setup()
rlog.log_to_file({str(tmp_path)!r})
rlog.quiet_console()
path = rlog.native_stderr_to_log()
os.write(2, b"[E core_worker.cc:2465] native chatter\\n")
lg.info("our line")
print("python stderr", file=sys.stderr)
rlog.restore_native_stderr()
os.write(2, b"after restore\\n")
print(path)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "rdistill our line" in p.stderr and "python stderr" in p.stderr and "after restore" in p.stderr
    assert "native chatter" not in p.stderr
    native = tmp_path / "logs" / "native.log"
    assert p.stdout.strip() == str(native) and "native chatter" in native.read_text()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_a_throttled_line_otherwise(monkeypatch):
    """On a terminal a job's progress redraws one bar in place and rdistill's lines are written
    above it; without one it is a line with the rate and ETA, at most every every_s seconds."""
    from rdistill import progress
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    handler = rlog._Console(term)
    rlog.log.addHandler(handler)
    try:
        for done in (0, 30, 60):
            assert progress.show("data", "  generate: Write", done, 120)
        rlog.log.info("a stage line")
        progress.show("data", "  generate: Write", 90, 120)
        rlog.set_stage("verify")  # a new stage closes the bars
        assert not progress._bars
    finally:
        rlog.log.removeHandler(handler)
        progress.close_all()
    out = term.getvalue()
    frames = out.split("\r")
    assert any(f.startswith("generate: Write:  50%|") and "60/120" in f for f in frames), out
    assert "generate: Write:  75%|" in out and "\n" not in out.replace("a stage line\n", "")
    before_line = out[:out.index("a stage line")]
    assert before_line.endswith("\r") and before_line.rsplit("\r", 2)[-2].strip() == ""  # cleared first

    lines = []
    logger = logging.getLogger("test.progress")
    monkeypatch.setattr(logger, "info", lines.append)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    t0 = __import__("time").monotonic() - 10
    assert progress.show("k", "train", 50, 200, unit="steps", since=t0, log=logger)
    assert not progress.show("k", "train", 60, 200, unit="steps", since=t0, log=logger)  # within every_s
    assert lines == ["train 50/200 steps (5.0/s, eta 30s)"]
    progress.close_all()


@pytest.mark.slow
def test_ray_data_progress_is_a_bar_on_a_real_terminal(tmp_path):
    """Under a pseudo-terminal, a Ray Data pipeline of a quiet run moves rdistill's bar (Ray Data
    logs its progress to rdistill, not through its own bars, which reached no console)."""
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios
    script = tmp_path / "run.py"
    script.write_text("""
import time, ray, ray.data
from rdistill import log as rlog
lg = rlog.setup()
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster left running
rlog.quiet_console()
rlog.set_stage("verify")
def slow(b):
    time.sleep(0.4)
    return b
lg.info("before")
ray.data.range(1000, override_num_blocks=16).map_batches(slow).materialize()
lg.info("after")
rlog.set_stage("")
ray.shutdown()
""")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the script on the terminal
        os.execv(sys.executable, [sys.executable, str(script)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a window 120 wide
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    frames = text[text.index("rdistill before"):text.index("rdistill after")].split("\r")
    bars = [f for f in frames if f.startswith("verify: ReadRange->MapBatches(slow):") and "%|" in f]
    import re
    moved = [f for f in bars if re.search(r" [1-9]\d*/\d{3,} \[", f)]  # rows done out of Ray Data's estimate
    assert len(bars) >= 3 and moved, text[-3000:]
    assert "Running Dataset" not in text
