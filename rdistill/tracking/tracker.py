"""The run tree of one pipeline run (parent -> stage -> branch/candidate), its resume state, and
the guard that keeps tracking failures from costing pipeline work.

Every backend call goes through `Tracker._guard`: the first failure (server down, bad
credentials, a missing package) logs one warning line and disables the tracker for the rest of
the process; the pipeline never sees the exception.

Resume state lives in `<run_dir>/tracking.json`, keyed by where the runs go (backend, URI,
experiment): the parent run id, and per stage the id of its latest run, the hash of the config
slice it was opened with, whether it finished, and its children (with the last train step
logged). A stage that did not finish, rerun with the same config slice, reopens its run (and its
children) instead of starting a new one; a finished stage that reruns (config change, force)
gets a new run under the same parent; a skipped stage is never touched.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from rdistill.log import log
from rdistill.rundir import stable_hash, write_json_atomic
from rdistill.tracking.figures import Figures, numbers

STATE = "tracking.json"


class RunHandle:
    """A nested run the stage code logs to (a train branch, a merge candidate); a no-op when
    tracking is off or has failed."""

    def __init__(self, tracker: "Tracker | None" = None, stage: str = "", key: str = "",
                 run_id: str | None = None):
        self._t, self.stage, self.key, self.run_id = tracker, stage, key, run_id

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Log the numeric leaves of `metrics` (nested dicts flattened to a/b/c)."""
        if self._t is not None and self.run_id:
            self._t.log(self.run_id, numbers(metrics), step)

    def end(self, ok: bool = True) -> None:
        if self._t is not None and self.run_id:
            self._t.end_child(self.stage, self.key, "FINISHED" if ok else "FAILED")


class Tracker:
    def __init__(self, backend: Any = None, run_dir: Path | None = None, *, run_name: str = "",
                 parent_params: dict | None = None, tags: dict[str, str] | None = None,
                 log_models: bool = False, poll_s: float = 10.0):
        self.backend = backend
        self.poll_s = poll_s
        self.enabled = backend is not None
        self.log_models = log_models
        self._name, self._params, self._tags = run_name, parent_params or {}, tags or {}
        self._lock = threading.RLock()
        self._path = Path(run_dir) / STATE if run_dir is not None else None
        self._all: dict = {}
        self._state: dict = {"parent": None, "stages": {}}
        self._open: list[tuple[str, str | None]] = []  # (stage, child key or None) opened here
        self._parent_open = False
        self.tailers: list = []  # live-curve threads (rdistill.tracking.tailer), stopped by finish()
        if self.enabled and self._path is not None and self._path.exists():
            try:
                self._all = json.loads(self._path.read_text())
            except ValueError:
                log.warning("tracking: %s is unreadable; starting new tracking runs", self._path)
        if self.enabled:
            self._state = self._all.setdefault(backend.target, self._state)

    # -- failure handling ------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (any tracker failure: warn once, keep the pipeline going)
            with self._lock:
                if self.enabled:
                    self.enabled = False
                    first = " ".join(str(e).split())[:300]  # one line, whatever the client raised
                    if isinstance(e, ImportError):
                        first += ": pip install 'rdistill[tracking]'"
                    log.warning("tracking: %s %s failed (%s: %s); the pipeline goes on without tracking",
                                self.backend.name, what, type(e).__name__, first)
            return None

    def _save(self) -> None:
        if self._path is not None:
            try:
                write_json_atomic(self._path, self._all)
            except OSError as e:  # the run directory's own problems surface elsewhere
                log.debug("tracking: cannot write %s: %s", self._path, e)

    # -- the run tree ----------------------------------------------------------------------
    def _parent(self) -> str | None:
        """The parent run, opened (or reopened) on the first stage that runs: a rerun that
        skips every stage touches nothing."""
        with self._lock:
            if not self._parent_open and self.enabled:
                old = self._state.get("parent")
                rid = self._guard("open the parent run", self.backend.open, old, self._name, parent=None,
                                  kind="pipeline", params=self._params, tags=self._tags)
                if rid:
                    self._state["parent"], self._parent_open = rid, True
                    self._save()
            return self._state.get("parent") if self._parent_open else None

    def stage_started(self, stage: str, params: dict) -> None:
        parent = self._parent()
        if not parent:
            return
        with self._lock:
            h = stable_hash(params)
            entry = self._state["stages"].get(stage)
            resume = bool(entry and entry.get("id") and not entry.get("finished") and entry.get("config_hash") == h)
            rid = self._guard(f"open the {stage} run", self.backend.open, entry["id"] if resume else None, stage,
                              parent=parent, kind="stage", params=params, tags={"rdistill.stage": stage})
            if not rid:
                return
            if not resume or rid != entry["id"]:
                entry = {"id": rid, "config_hash": h, "finished": False, "children": {}}
            self._state["stages"][stage] = entry
            self._open.append((stage, None))
            self._save()

    def _stage_id(self, stage: str) -> str | None:
        e = self._state["stages"].get(stage)
        return e["id"] if e and (stage, None) in self._open else None

    def child(self, stage: str, key: str, params: dict | None = None) -> RunHandle:
        """A nested run under the running stage's run; within one resumed stage run the same key
        reopens the same child."""
        sid = self._stage_id(stage) if self.enabled else None
        if not sid:
            return RunHandle()
        with self._lock:
            kids = self._state["stages"][stage].setdefault("children", {})
            old = kids.get(key, {}).get("id")
            if (stage, key) in self._open:  # already open in this process
                return RunHandle(self, stage, key, old)
            rid = self._guard(f"open the {stage}/{key} run", self.backend.open, old, f"{stage}/{key}", parent=sid,
                              kind=f"{stage}-child", params=params,
                              tags={"rdistill.stage": stage, "rdistill.child": key})
            if not rid:
                return RunHandle()
            if rid != old:
                kids[key] = {"id": rid, "last_step": 0}
            kids[key]["finished"] = False
            self._open.append((stage, key))
            self._save()
        return RunHandle(self, stage, key, rid)

    def log(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        if metrics:
            self._guard("logging", self.backend.log_metrics, run_id, metrics, step)

    def log_steps(self, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        rows = [(s, m) for s, m in sorted(rows, key=lambda r: r[0]) if m]
        if rows:
            self._guard("logging", self.backend.log_steps, run_id, rows)

    def last_step(self, stage: str, key: str) -> int:
        with self._lock:
            return int(self._state["stages"].get(stage, {}).get("children", {}).get(key, {}).get("last_step", 0))

    def set_last_step(self, stage: str, key: str, step: int) -> None:
        with self._lock:
            kid = self._state["stages"].get(stage, {}).get("children", {}).get(key)
            if kid is not None:
                kid["last_step"] = int(step)
                self._save()

    def end_child(self, stage: str, key: str, status: str) -> None:
        with self._lock:
            kid = self._state["stages"].get(stage, {}).get("children", {}).get(key)
            if kid is None or (stage, key) not in self._open:
                return
            self._open.remove((stage, key))
            self._guard(f"ending the {stage}/{key} run", self.backend.end, kid["id"], status)
            kid["finished"] = status == "FINISHED"
            self._save()

    def _log_figures(self, run_id: str, f: Figures, what: str) -> None:
        self.log(run_id, f.scalars)
        self.log_steps(run_id, list(f.steps.items()))
        if f.artifacts:
            self._guard(f"uploading the {what} artifacts", self.backend.log_artifacts, run_id, f.artifacts)

    def stage_finished(self, stage: str, manifest: dict, stage_dir: Path) -> None:
        sid = self._stage_id(stage) if self.enabled else None
        if not sid:
            return
        from rdistill.tracking.figures import stage_figures
        f = stage_figures(stage, manifest, Path(stage_dir), self.log_models)
        self._log_figures(sid, f, stage)
        for c in f.children:
            h = self.child(stage, c.name, c.params)
            if h.run_id:
                self._log_figures(h.run_id, Figures(scalars=c.scalars, steps=c.steps), c.name)
                h.end()
        parent = self._state.get("parent")
        self.log(parent, f.parent)
        if f.parent_artifacts:
            self._guard(f"uploading the {stage} artifacts", self.backend.log_artifacts, parent, f.parent_artifacts)
        with self._lock:
            for s, k in [o for o in self._open if o[0] == stage and o[1] is not None]:
                self.end_child(s, k, "FINISHED")
            self._open.remove((stage, None))
            self._guard(f"ending the {stage} run", self.backend.end, sid, "FINISHED")
            self._state["stages"][stage]["finished"] = True
            self._save()

    def finish(self, status: str, config_file: Path | None = None) -> None:
        """End what this process opened with `status` (FINISHED, FAILED, KILLED): the stage and
        child runs a failure left open (their ids stay, so the rerun reopens them), then the parent."""
        for tailer in self.tailers:  # a stage killed mid-train never called stop()
            tailer.halt()
        with self._lock:
            for stage, key in reversed(list(self._open)):
                if key is None:
                    self._open.remove((stage, None))
                    self._guard(f"ending the {stage} run", self.backend.end, self._state["stages"][stage]["id"],
                                status)
                else:
                    self.end_child(stage, key, status)
            if self._parent_open:
                if config_file is not None and config_file.exists():
                    self._guard("uploading config.json", self.backend.log_artifacts, self._state["parent"],
                                [(config_file, None)])
                self._guard("ending the parent run", self.backend.end, self._state["parent"], status)
                self._parent_open = False
            if self.backend is not None:
                try:
                    self.backend.close()
                except Exception as e:  # noqa: BLE001
                    log.debug("tracking: closing %s: %s", self.backend.name, e)
                self._save()
            self.enabled = False  # a late call from a leftover thread is a no-op
