"""Run N jobs at once: one helper for every stage that fans work out (branches in train, models
in evaluate, tensor units in merge, within the merge's memory budget).

Jobs are zero-argument callables (a `TorchTrainer.fit`, a `ray.get` of a remote task, a merge
unit in this process) run in daemon threads, at most `n` at a time. Daemon threads, unlike a
ThreadPoolExecutor's, never keep a Ctrl-C'd driver alive waiting on work that `ray.shutdown()`
has already ended; the main thread joins in short waits so it stays responsive to Ctrl-C.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence


def run_at_most(n: int, jobs: Sequence[Callable[[], object]], fail_fast: bool = True,
                name: str = "job", costs: Optional[Sequence[int]] = None,
                budget: Optional[int] = None) -> list:
    """Results in job order. fail_fast: after the first error no new job starts, and that error
    is raised once the running ones end. Otherwise every job runs (a failed branch must not stop
    the others, whose checkpoints then stay) and the first error is raised at the end.
    costs and budget (the merge's memory): a job also waits until its cost fits beside those
    running within the budget; one job always runs, whatever its cost (the caller sized them)."""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    costs = costs or [0] * len(jobs)
    cond = threading.Condition()
    held = {"jobs": 0, "cost": 0}

    def work(i: int, fn: Callable[[], object]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 (re-raised in the calling thread)
            errors.append(e)
        finally:
            with cond:
                held["jobs"] -= 1
                held["cost"] -= costs[i]
                cond.notify_all()

    def full(i: int) -> bool:
        return held["jobs"] >= max(1, n) or bool(
            budget is not None and held["jobs"] and held["cost"] + costs[i] > budget)

    threads = []
    for i, fn in enumerate(jobs):
        with cond:
            while full(i) and not (errors and fail_fast):
                cond.wait(0.5)  # short waits: Ctrl-C reaches the main thread
            if errors and fail_fast:
                break
            held["jobs"] += 1
            held["cost"] += costs[i]
        threads.append(threading.Thread(target=work, args=(i, fn), daemon=True, name=f"{name}-{i}"))
        threads[-1].start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    if errors:
        raise errors[0]
    return results
