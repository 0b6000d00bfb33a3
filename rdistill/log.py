"""Logging that tells a user where they are: one logger, stage lines, throttled progress."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("rdistill")


def setup(level: int = logging.INFO) -> logging.Logger:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s rdistill %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level)
    return log


class Progress:
    """Prints `label: done/total (rate/s, eta)` at most every `every_s` seconds."""

    def __init__(self, label: str, total: int | None = None, unit: str = "rows", every_s: float = 10.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.done = 0
        self.start = self._last = time.monotonic()

    def update(self, n: int = 1, **extra) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.total and self.done >= self.total):
            self._last = now
            self._emit(now, extra)

    def _emit(self, now: float, extra: dict) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        msg = f"{self.label}: {self.done}"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            msg += f"/{self.total} {self.unit} ({rate:.1f}/s, eta {eta:.0f}s)"
        else:
            msg += f" {self.unit} ({rate:.1f}/s)"
        if extra:
            msg += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        log.info(msg)


_log_file: str | None = None


def log_to_file(run_dir: str) -> str | None:
    """Also write every rdistill log line (debug included) to <run_dir>/logs/run-<time>.log, where
    the entry point adds the traceback of a failure that it reports in one line. Returns the path
    (None when the folder cannot be created: the run itself then says why)."""
    global _log_file
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
    log.setLevel(logging.DEBUG)
    for handler in log.handlers:  # the console keeps its level
        if handler is not h and handler.level == logging.NOTSET:
            handler.setLevel(logging.INFO)
    _log_file = path
    return path


def log_file_path() -> str | None:
    return _log_file
