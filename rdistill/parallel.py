"""Run N jobs at once: one helper for every stage that fans work out (branches in train, models
in evaluate, tensor units in merge).

Jobs are zero-argument callables (a `TorchTrainer.fit`, a `ray.get` of a remote task, a merge
unit in this process) run in daemon threads, at most `n` at a time. Daemon threads, unlike a
ThreadPoolExecutor's, never keep a Ctrl-C'd driver alive waiting on work that `ray.shutdown()`
has already ended; the main thread joins in short waits so it stays responsive to Ctrl-C.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence


def run_at_most(n: int, jobs: Sequence[Callable[[], object]], fail_fast: bool = True,
                name: str = "job") -> list:
    """Results in job order. fail_fast: after the first error no new job starts, and that error
    is raised once the running ones end. Otherwise every job runs (a failed branch must not stop
    the others, whose checkpoints then stay) and the first error is raised at the end."""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    gate = threading.Semaphore(max(1, n))

    def work(i: int, fn: Callable[[], object]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 (re-raised in the calling thread)
            errors.append(e)
        finally:
            gate.release()

    threads = []
    for i, fn in enumerate(jobs):
        while not gate.acquire(timeout=0.5):  # short waits: Ctrl-C reaches the main thread
            pass
        if errors and fail_fast:
            gate.release()
            break
        threads.append(threading.Thread(target=work, args=(i, fn), daemon=True, name=f"{name}-{i}"))
        threads[-1].start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    if errors:
        raise errors[0]
    return results
