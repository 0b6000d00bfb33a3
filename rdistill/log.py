"""Logging that tells a user where they are: one logger, stage lines, throttled progress."""

from __future__ import annotations

import logging
import re
import sys
import time

from rdistill import progress

log = logging.getLogger("rdistill")


class _Console(logging.StreamHandler):
    """rdistill's console lines, written above any progress bar on a terminal (not through it)."""

    def emit(self, record: logging.LogRecord) -> None:
        with progress.console_write():
            super().emit(record)


def setup(level: int = logging.INFO) -> logging.Logger:
    if not log.handlers:
        h = _Console(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s rdistill %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level)
    return log


_log_file: str | None = None
_file_handler: logging.Handler | None = None
_quiet = False


def log_to_file(run_dir: str) -> str | None:
    """Also write every rdistill log line (debug included) to <run_dir>/logs/run-<time>.log, where
    the entry point adds the traceback of a failure that it reports in one line. Returns the path
    (None when the folder cannot be created: the run itself then says why)."""
    global _log_file, _file_handler
    import os
    try:
        d = os.path.join(run_dir, "logs")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, time.strftime("run-%Y%m%d-%H%M%S.log"))
        h = logging.FileHandler(path)
    except OSError:
        return None
    h.setLevel(logging.DEBUG)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(h)
    _file_handler = h
    log.setLevel(logging.DEBUG)
    for handler in log.handlers:  # the console keeps its level
        if handler is not h and handler.level == logging.NOTSET:
            handler.setLevel(logging.INFO)
    _log_file = path
    return path


def log_file_path() -> str | None:
    return _log_file


# ---------------------------------------------------------------- the console: rdistill's lines only

_TRACEBACK = re.compile(r"\s*(?:Error:\s*)?Traceback \(most recent call last\):?")
_NOTABLE = re.compile(r"Traceback \(most recent call last\)|\b(?:ERROR|CRITICAL|OutOfMemoryError|out of memory|"
                      r"OOM|SIGKILL|Killed|died)\b")
# A Python warning printed by a worker is not an error, whatever its words ("resource_tracker:
# process died unexpectedly, relaunching" as a vLLM engine's subprocess exits): the log only.
_PY_WARNING = re.compile(r"\b[A-Z]\w*Warning: ")


def quiet_console(verbose: bool = False) -> None:
    """Third-party output goes to the run log, not the console: Ray's, Ray Data's progress blocks,
    vLLM's, torch's and Python's warnings lose their console handlers and write to the run log
    instead, and Ray workers' output (`capture_worker_output`) likewise. Only the command line asks
    for this (a library caller keeps the full stream); `verbose=true` leaves the stream as it is.
    Idempotent: called again after imports and at each stage, since libraries set up their
    loggers when first imported."""
    global _quiet
    if verbose:
        return
    _quiet = True
    logging.captureWarnings(True)
    try:  # Ray and Ray Data set up their console handlers on import: import them first
        import ray.data  # noqa: F401
    except ImportError:
        pass
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
                                       if not n.startswith("rdistill")]
    for lg in loggers:
        console = [h for h in lg.handlers if _is_console(h)]
        for h in console:
            lg.removeHandler(h)
        if console and _file_handler is not None and _file_handler not in lg.handlers:
            lg.addHandler(_file_handler)
    # A library logger left without handlers (vLLM's, once its console handler is gone, or when
    # it configures none) would reach Python's last-resort handler, which prints bare lines to
    # stderr: the root logger always has a handler, the run log's (rdistill's own does not
    # propagate, so nothing is written twice).
    root = logging.getLogger()
    if _file_handler is not None and _file_handler not in root.handlers:
        root.addHandler(_file_handler)
    elif _file_handler is None and not root.handlers:
        root.addHandler(logging.NullHandler())
    # ray.llm's modules give each logger a console handler when first imported, which happens
    # mid-stage (e.g. "No cloud storage mirror configured" as a processor starts), unless the
    # "ray.llm" parent already has a handler: give it the run log's.
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(_file_handler if _file_handler is not None else logging.NullHandler())
        llm.propagate = False
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.propagate = False
    if _file_handler is not None and _file_handler not in py_warnings.handlers:
        py_warnings.addHandler(_file_handler)
    data = logging.getLogger("ray.data._internal.progress.logging_progress")
    if not any(isinstance(h, _DataProgress) for h in data.handlers):
        data.addHandler(_DataProgress())
    _data_progress_through_log()


def _data_progress_through_log() -> None:
    """Ray Data reports progress through its logging manager (the blocks `_DataProgress` reads)
    only when stdout is not a terminal. On a terminal it draws Ray's tqdm bars, which reach no
    console once its output is quieted: the user saw nothing move for minutes. So Ray Data always
    logs its progress here, every 2 s on a terminal (rdistill's bar moves), else every 10 s."""
    try:
        from ray.data._internal.execution import streaming_executor as executor
        from ray.data._internal.progress.logging_progress import LoggingExecutionProgressManager as Logging
    except ImportError:  # another Ray: its own progress display stays
        return
    if progress.on_terminal():
        Logging.LOG_REPORT_INTERVAL_SEC = 2
    ray_default = executor.get_progress_manager
    if getattr(ray_default, "rdistill", False):
        return

    def through_log(ctx, dataset_id, topology, verbose_progress):
        if not ctx.enable_progress_bars:  # turned off by the user: Ray's no-op manager
            return ray_default(ctx, dataset_id, topology, verbose_progress)
        return Logging(dataset_id, topology, ctx.enable_operator_progress_bars, verbose_progress)

    through_log.rdistill = True
    executor.get_progress_manager = through_log


def _is_console(h: logging.Handler) -> bool:
    """A handler that writes to a terminal stream (not a file, not an in-memory buffer)."""
    import io
    if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler):
        return False
    return not isinstance(getattr(h, "stream", None), io.StringIO)


_NOT_OPS = ("Total Progress", "Active & requested resources")  # the block's header lines
_OP = re.compile(r"^-?\s*(?P<name>[^:]+):\s*(?P<done>\d+)/(?P<total>\d+|\?)")


class _DataProgress(logging.Handler):
    """Ray Data's progress block without a terminal (15 lines every 10 s per running dataset) as
    one rdistill line every 30 s, whichever datasets run: the furthest operator rows have reached
    (the write or the final map), its count, its rate since the dataset started and an ETA."""

    def __init__(self, every_s: float = 30.0):
        super().__init__(logging.INFO)
        self.every_s, self.block, self.name = every_s, None, ""
        self.started: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = " ".join(record.getMessage().split())
        if msg.startswith("======= Running Dataset"):
            self.block, self.name = [], msg.split("Dataset:", 1)[-1].strip(" =")
        elif self.block is not None and msg.startswith("====="):
            lines, self.block = self.block, None
            now = time.monotonic()
            t0 = self.started.setdefault(self.name, now)
            ops = [m for m in map(_OP.match, lines) if m and not m["name"].startswith(_NOT_OPS)]
            # the furthest operator that rows have reached: how far the pipeline's output is
            reached = [m for m in ops if m["done"] != "0"] or ops[:1]
            if not reached:
                return
            m = reached[-1]
            op = re.sub(r"^MapBatches\((.*)\)$", r"\1", m["name"].lstrip("- ").strip())
            total = None if m["total"] == "?" else int(m["total"])
            # one bar (or one line every every_s) per stage, whichever of its datasets runs
            progress.show("data", f"  {_stage or 'data'}: {op}", int(m["done"]), total,
                          every_s=self.every_s, since=t0)
        elif self.block is not None and msg:
            self.block.append(msg)


_stage = ""


def set_stage(name: str) -> None:
    """The stage running now: its name starts the progress lines of the libraries it drives."""
    global _stage
    _stage = name
    progress.close_all()


def _first_line(text: str) -> str:
    """A worker's message as one console line: its first line, without a traceback's header."""
    first = (text.strip().splitlines() or [""])[0]
    return _TRACEBACK.split(first)[0].strip()[:300]


_native: tuple | None = None  # (saved stderr fd, Python's stderr before) while redirected


def native_stderr_to_log() -> str | None:
    """What native code writes to file descriptor 2 goes to `<run_dir>/logs/native.log`: Ray's C++
    core worker logs there directly (e.g. its "constructor arguments in the object store" line for
    every Ray Data actor pool), as do vLLM's and torch's extensions, and no logger can catch it.
    Python's own stderr (rdistill's console lines, a bug's traceback) keeps the terminal, through a
    copy of the old descriptor. Only the command line calls this; `restore_native_stderr` undoes it."""
    global _native
    if not _quiet or _log_file is None or _native is not None:
        return None
    import os
    path = os.path.join(os.path.dirname(_log_file), "native.log")
    try:
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1, errors="replace")
    _native = (saved, sys.stderr)
    for h in log.handlers:
        if _is_console(h):
            h.setStream(console)
    sys.stderr = console
    os.dup2(target, 2)
    os.close(target)
    return path


def restore_native_stderr() -> None:
    """File descriptor 2 and `sys.stderr` as they were before `native_stderr_to_log`."""
    global _native
    if _native is None:
        return
    import os
    saved, before = _native
    _native = None
    console = sys.stderr
    console.flush()
    os.dup2(saved, 2)
    os.close(saved)
    sys.stderr = before
    for h in log.handlers:
        if getattr(h, "stream", None) is console:
            h.setStream(before)
    console.close()


def requiet() -> None:
    """`quiet_console` again if the command line turned it on (after imports that set up loggers)."""
    if _quiet:
        quiet_console()


def capture_worker_output() -> None:
    """Ray workers' stdout and stderr (what Ray streams to the driver) go to
    `<run_dir>/logs/workers.log`; a line that matters (an error, a traceback, an out-of-memory, a
    worker that died) still reaches the console as one rdistill line per process and minute.
    Does nothing unless `quiet_console` is on."""
    if not _quiet or _log_file is None:
        return
    import os

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    path = os.path.join(os.path.dirname(_log_file), "workers.log")
    out = open(path, "a", buffering=1, errors="replace")
    told: dict = {}
    in_traceback: set = set()  # processes printing a traceback: its exception line is the one to show

    def handle(data: dict) -> None:
        pid = data.get("pid")
        who = data.get("actor_name") or data.get("task_name") or f"pid={pid}"
        for line in data.get("lines", []):
            out.write(f"({who} pid={pid}) {line}\n")
            first = _first_line(line)
            if not first:  # a bare traceback header: wait for the exception line under it
                if _TRACEBACK.match(line.strip()):
                    in_traceback.add(pid)
                continue
            if pid in in_traceback:
                if line[:1].isspace():
                    continue
                in_traceback.discard(pid)
            elif not (_NOTABLE.search(line) or "retried" in line) or _PY_WARNING.search(line):
                continue
            now = time.monotonic()
            if now - told.get(pid, -1e9) >= 60:
                told[pid] = now
                log.warning("worker %s: %s (more in %s)", who, first, path)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("rdistill_worker_log")
    dispatcher.add_handler("rdistill_worker_log", handle)
    # Errors the cluster publishes to the driver (a task retried, a worker killed) do not go
    # through the dispatcher: Ray's error listener prints them with this module function.
    import ray._private.worker as ray_worker
    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: handle(data)
