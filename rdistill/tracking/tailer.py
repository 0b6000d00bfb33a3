"""Live loss curves of the train stage's branches: a driver thread tails the progress files the
rank-0 Ray Train worker of each branch appends to (one JSON line per optimizer step: step, loss,
lr, tokens, tokens_per_s, padding_share, ...) and logs each new step to the branch's nested run.

Tailing files, not reporting from the workers: the workers then need neither the tracking
client nor its credentials, only rank 0 writes the file (so only rank 0 is logged), and a branch
that crashes and resumes from its checkpoint appends to the same file. The last step logged per
branch is kept in tracking.json, so the steps a resumed branch repeats, and the lines a new
driver process reads again from the start of the file, are not logged twice.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from rdistill.log import log
from rdistill.tracking.figures import numbers
from rdistill.tracking.tracker import RunHandle, Tracker


class _Branch:
    def __init__(self, handle: RunHandle, path: Path, last_step: int):
        self.handle, self.path, self.last_step, self.offset = handle, Path(path), last_step, 0


class ProgressTailer:
    def __init__(self, tracker: Tracker, stage: str, branches: dict[str, tuple[Path, dict]], poll_s: float):
        self.tracker, self.stage, self.poll_s = tracker, stage, poll_s
        self._branches = {key: _Branch(tracker.child(stage, key, params), path, tracker.last_step(stage, key))
                          for key, (path, params) in branches.items()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ProgressTailer":
        if any(b.handle.run_id for b in self._branches.values()):
            self._thread = threading.Thread(target=self._loop, name=f"tracking-tail-{self.stage}", daemon=True)
            self._thread.start()
            self.tracker.tailers.append(self)
        return self

    def halt(self) -> None:
        """Stop the thread without a final read (the pipeline is ending on a failure)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, 3 * self.poll_s))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> int:
        """Log the complete lines appended since the last poll; returns how many steps were logged."""
        logged = 0
        for key, b in self._branches.items():
            if not b.handle.run_id or not self.tracker.enabled:
                continue
            try:
                if not b.path.exists():
                    continue
                if b.path.stat().st_size < b.offset:  # rewritten from scratch: read it again
                    b.offset = 0
                with b.path.open("rb") as f:
                    f.seek(b.offset)
                    chunk = f.read()
            except OSError as e:
                log.debug("tracking: cannot read %s: %s", b.path, e)
                continue
            end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
            b.offset += end
            rows = []
            for line in chunk[:end].splitlines():
                try:
                    rec = json.loads(line)
                    step = int(rec["step"])
                except (ValueError, KeyError, TypeError):
                    continue
                if step > b.last_step:
                    rows.append((step, numbers({k: v for k, v in rec.items() if k != "step"})))
                    b.last_step = step
            if rows:
                self.tracker.log_steps(b.handle.run_id, rows)
                self.tracker.set_last_step(self.stage, key, b.last_step)
                logged += len(rows)
        return logged

    def stop(self, results: dict[str, dict] | None = None) -> None:
        """Read what is left, log each branch's final figures (the metrics fit_sft returned) and
        end its run: finished when it has results, failed when it has none."""
        self.halt()
        self.poll()
        for key, b in self._branches.items():
            res = (results or {}).get(key)
            if res is not None:  # under total/: tokens_per_s and padding_share are per-step names too
                b.handle.log({"total": res})
            b.handle.end(ok=res is not None)


def tail_progress(stage: str, branches: dict[str, tuple[Path, dict]], poll_s: float | None = None) -> ProgressTailer:
    """Open a nested run per branch under `stage`'s run and start tailing their progress files;
    a no-op (no thread, no runs) when tracking is off."""
    from rdistill.tracking import current
    t = current()
    return ProgressTailer(t, stage, branches if t.enabled else {}, poll_s or t.poll_s).start()
