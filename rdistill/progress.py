"""Live progress of long work on the console, one home for every stage: on a terminal, a tqdm bar
per running job, redrawn in place; otherwise (a log file, `ray job submit`, CI) one line per job
every `every_s` seconds with its count, rate and ETA, so a captured console stays short.

rdistill's own log lines are written above the bars (`console_write`), never through them. The
bars of a stage are closed when the next stage starts (`close_all`, called by `log.set_stage`).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

_lock = threading.RLock()
_bars: dict = {}  # key -> tqdm bar (terminal only)
_last: dict[str, float] = {}  # key -> when its last line was written (no terminal)
_start: dict[str, float] = {}  # key -> when it was first shown (its rate and ETA)


def on_terminal(stream=None) -> bool:
    """Whether the console (rdistill's stderr) is a terminal a bar can be redrawn on."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def line(label: str, done: int, total: int | None, elapsed: float, unit: str = "", extra: str = "") -> str:
    """`label done/total unit (rate/s, eta Ns) extra`: the line shown without a terminal."""
    text = f"{label} {done}/{total if total else '?'}{' ' + unit if unit else ''}"
    if done and elapsed >= 1:
        rate = done / elapsed
        text += f" ({rate:.1f}/s" + (f", eta {max(0, total - done) / rate:.0f}s)" if total else ")")
    return text + (f" {extra}" if extra else "")


def show(key: str, label: str, done: int, total: int | None, *, unit: str = "", extra: str = "",
         every_s: float = 30.0, since: float | None = None, log=None) -> bool:
    """Report a job's progress. On a terminal its bar moves; otherwise a line is logged (through
    `log`, rdistill's logger by default) at most every `every_s` seconds per key, its rate counted
    from `since` (a `time.monotonic()`; default: when the key was first shown). Returns whether
    something was written."""
    now = time.monotonic()
    with _lock:
        t0 = _start.setdefault(key, now) if since is None else since
        if on_terminal():
            bar = _bars.get(key)
            if bar is None:
                from tqdm import tqdm
                bar = _bars[key] = tqdm(total=total or None, desc=label.strip(), unit=f" {unit}" if unit else "it",
                                        file=sys.stderr, leave=False, dynamic_ncols=True, position=len(_bars),
                                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                   "[{elapsed}<{remaining}{postfix}]" if total else None)
            if total and bar.total != total:
                bar.total = total
            bar.n = done
            bar.set_description_str(label.strip(), refresh=False)
            bar.set_postfix_str(extra, refresh=False)
            bar.refresh()
            return True
        if now - _last.get(key, -1e18) < every_s:
            return False
        _last[key] = now
    if log is None:
        from rdistill.log import log
    log.info(line(label, done, total, now - t0, unit, extra))
    return True


def close_all() -> None:
    """Close every bar (a stage ended) and forget every job's timing."""
    with _lock:
        for bar in _bars.values():
            bar.close()
        _bars.clear()
        _last.clear()
        _start.clear()


@contextmanager
def console_write() -> Iterator[None]:
    """Write a console line above the bars: they are cleared first and redrawn after."""
    with _lock:
        if not _bars:
            yield
            return
        for bar in _bars.values():
            bar.clear()
        try:
            yield
        finally:
            for bar in _bars.values():
                bar.refresh()
