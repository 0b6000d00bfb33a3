"""Weights & Biases through its official client (`wandb`).

W&B has no nested runs: the parent and every stage, branch and candidate run share a `group`
(the parent's name and id), with `job_type` saying which level a run is and the parent's id in
its config. Several runs are open at once (the train stage's branches), hence
`reinit="create_new"`. `WANDB_MODE=offline` writes them under <run_dir>/wandb (or WANDB_DIR) for
a later `wandb sync`. Ray's `setup_wandb` is for code inside Train/Tune workers; the driver owns
the runs here.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from rdistill.config.tracking import TrackingConfig


class WandbBackend:
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.base_url = cfg.uri or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        self.entity = cfg.entity or os.environ.get("WANDB_ENTITY")
        self.target = f"wandb {self.base_url} {self.entity or '-'}/{cfg.experiment}"
        self._runs: dict[str, object] = {}
        self._group: str | None = None
        self._pipeline_name = ""

    def _settings(self):
        import wandb
        extra = {"base_url": self.cfg.uri} if self.cfg.uri else {}
        # one process holds many runs: no console capture or system-metrics sampler per run
        return wandb.Settings(init_timeout=self.cfg.timeout_s, console="off", x_disable_stats=True,
                              silent=True, **extra)

    def check(self) -> None:
        """Offline and disabled modes need nothing; online needs the server and the API key."""
        if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
            return
        import wandb
        api = wandb.Api(timeout=max(1, int(self.cfg.timeout_s)), overrides={"base_url": self.base_url})
        api.viewer  # noqa: B018 (an authenticated request: raises without a key, on a bad one, on a dead server)

    def open(self, run_id: str | None, name: str, *, parent: str | None, kind: str,
             params: dict | None, tags: dict[str, str]) -> str:
        import wandb
        if kind == "pipeline":
            self._pipeline_name = name
        full = name if kind == "pipeline" else f"{self._pipeline_name}/{name}"
        config = dict(params or {})
        if parent:
            config["parent_run"] = parent
        if tags:  # W&B tags are short labels (64 characters at most): the full ones go in the config
            config["tags"] = dict(tags)
        run_id = run_id or uuid.uuid4().hex[:12]  # known before init: the parent's id names the group
        if kind == "pipeline":
            self._group = f"{name}-{run_id}"
        wdir = os.environ.get("WANDB_DIR") or str(self.run_dir)
        os.makedirs(wdir, exist_ok=True)
        labels = [t for t in (f"{k}={v}" for k, v in tags.items()) if len(t) <= 64]
        run = wandb.init(project=self.cfg.experiment, entity=self.entity, name=full, id=run_id,
                         resume="allow", reinit="create_new", group=self._group, job_type=kind,
                         config=config, allow_val_change=True, tags=labels, dir=wdir,
                         settings=self._settings())
        self._runs[run.id] = run
        return run.id

    def _run(self, run_id: str):
        run = self._runs.get(run_id)
        if run is None:
            raise RuntimeError(f"W&B run {run_id} is not open in this process")
        return run

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None) -> None:
        run = self._run(run_id)
        if step is None:  # a stage's figures: the run's summary, not a one-point chart
            run.summary.update(metrics)
        else:
            run.log(metrics, step=int(step))

    def log_steps(self, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        run = self._run(run_id)
        for step, metrics in rows:  # in increasing step order: W&B drops steps that go back
            run.log(metrics, step=int(step))

    def log_artifacts(self, run_id: str, items: list[tuple[Path, str | None]]) -> None:
        """One W&B artifact per destination folder (the report and its PNGs together); a rerun
        adds a version of it."""
        import wandb
        run = self._run(run_id)
        by_dest: dict[str | None, list[Path]] = {}
        for path, dest in items:
            by_dest.setdefault(dest, []).append(Path(path))
        for dest, paths in by_dest.items():
            name = re.sub(r"[^\w.-]+", "-", f"{run.name}-{dest or 'files'}").strip("-")[:120]
            art = wandb.Artifact(name=name, type=(dest or "files").split("/")[0])
            for p in paths:
                if p.is_dir():
                    art.add_dir(str(p))  # a folder's contents: the artifact is the folder
                else:
                    art.add_file(str(p), name=p.name)
            run.log_artifact(art)

    def end(self, run_id: str, status: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None:  # W&B knows finished and failed (a non-zero exit code) only
            run.finish(exit_code=0 if status == "FINISHED" else 1)

    def close(self) -> None:
        for rid in list(self._runs):
            self.end(rid, "FAILED")
        import wandb
        wandb.teardown()
