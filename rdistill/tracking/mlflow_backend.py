"""MLflow through its official client (`mlflow.MlflowClient`).

The client, not the fluent `mlflow.start_run` API: the fluent API keeps one active-run stack per
thread, while here the driver's main thread, the train stage's tailer thread and the merge loop
log to different runs at once. Nesting is what the fluent `start_run(nested=True)` records: the
`mlflow.parentRunId` tag. Ray's `setup_mlflow` is for code inside Train/Tune workers; the driver
owns the run tree here, so the workers need neither the client nor the credentials.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rdistill.config.tracking import TrackingConfig
from rdistill.tracking.figures import flat_params

_BATCH_METRICS, _BATCH_PARAMS = 1000, 100  # MLflow's per-request limits
_SET_HERE: set[str] = set()  # the client variables set here, not by the user


def _client_env(cfg: TrackingConfig) -> None:
    # The client's defaults retry for minutes with a 120 s timeout per try: a dead server would
    # hold the pipeline that long before the tracker can give up. The client reads these
    # variables on every request; values the user exported win.
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", cfg.retries), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 1),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", 0),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", max(1, int(cfg.timeout_s)))):
        if name not in os.environ or name in _SET_HERE:
            os.environ[name] = str(value)
            _SET_HERE.add(name)


def tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a SQLite store in the run directory (MLflow's
    own default is relative to the working directory, which `ray job submit` throws away)."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).absolute()}/mlflow.db"


class MlflowBackend:
    name = "mlflow"

    def __init__(self, cfg: TrackingConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.uri = tracking_uri(cfg, self.run_dir)
        self.target = f"mlflow {self.uri} {cfg.experiment}"
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            _client_env(self.cfg)
            from mlflow import MlflowClient
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def check(self) -> None:
        """One request that needs a reachable server and accepted credentials (preflight)."""
        self.client.search_experiments(max_results=1)

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                local = not self.uri.startswith(("http:", "https:", "databricks"))
                loc = (self.run_dir / "mlartifacts").absolute().as_uri() if local else None
                self._experiment_id = self.client.create_experiment(self.cfg.experiment, artifact_location=loc)
        return self._experiment_id

    def open(self, run_id: str | None, name: str, *, parent: str | None, kind: str,
             params: dict | None, tags: dict[str, str]) -> str:
        from mlflow.exceptions import MlflowException
        if run_id:
            # resume: the same run continues (a killed stage, a rerun of the pipeline); its params
            # were logged when it was created (MLflow refuses to change a logged param)
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # the server lost it (a new database): start over in a new run
        all_tags = {"rdistill.kind": kind, **tags}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id(), run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in flat_params(params).items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + _BATCH_PARAMS])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None) -> None:
        self.log_steps(run_id, [(int(step or 0), metrics)])

    def log_steps(self, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Many steps in as few requests as the batch limit allows (a tailed loss curve)."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for step, m in rows for k, v in m.items()]
        for i in range(0, len(items), _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=items[i:i + _BATCH_METRICS])

    def log_artifacts(self, run_id: str, items: list[tuple[Path, str | None]]) -> None:
        for path, dest in items:
            if Path(path).is_dir():  # a folder's contents go to dest itself (models/math/...)
                self.client.log_artifacts(run_id, str(path), dest)
            else:
                self.client.log_artifact(run_id, str(path), dest)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)  # FINISHED, FAILED or KILLED

    def close(self) -> None:
        self._client = None
