"""Progress while models train: on a terminal a bar of all jobs' steps (each job's step and last
loss beside it), redrawn every second; otherwise a console line every 30 s with each job's step out
of its total, its last loss, and an estimate of the time left (from the steps done so far). Read
from the progress files the rank-0 workers append to, so it costs the workers nothing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from rdistill import progress
from rdistill.log import log


def _last(path: Path) -> dict | None:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().splitlines()
        for line in reversed(lines):
            try:
                return json.loads(line)
            except ValueError:
                continue
    except OSError:
        return None
    return None


class TrainProgress:
    """`with TrainProgress({name: (progress_file, total_steps)}):` logs while the block runs."""

    def __init__(self, jobs: dict[str, tuple[Path, int]], every_s: float = 30.0):
        self.jobs, self.every_s = jobs, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)
        self.t0 = time.monotonic()

    def counts(self) -> tuple[list[str], int, int]:
        """Each job's `name step/steps loss x`, and the steps done and planned over all jobs."""
        parts, done, total = [], 0, 0
        for name, (path, steps) in self.jobs.items():
            rec = _last(Path(path)) or {}
            step = int(rec.get("step", 0))
            done, total = done + step, total + steps
            loss = f" loss {rec['loss']:.3f}" if isinstance(rec.get("loss"), (int, float)) else ""
            parts.append(f"{name} {step}/{steps}{loss}")
        return parts, done, total

    def line(self) -> str:
        parts, done, total = self.counts()
        elapsed = time.monotonic() - self.t0
        eta = f", eta {elapsed * (total - done) / done:.0f}s" if done else ""
        return f"train: {'; '.join(parts)} ({done}/{total} steps{eta})"

    def _loop(self) -> None:
        terminal = progress.on_terminal()
        while not self._stop.wait(1.0 if terminal else self.every_s):
            if terminal:
                parts, done, total = self.counts()
                progress.show("train", "train", done, total, unit="steps", extra="; ".join(parts))
            else:
                log.info(self.line())

    def __enter__(self) -> "TrainProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        progress.close_all()
