"""Typed config of experiment tracking (MLflow or Weights & Biases); see rdistill.tracking."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from rdistill.config.fields import fail, spec

TRACKING_BACKENDS = ["none", "mlflow", "wandb"]


@dataclass
class TrackingConfig:
    backend: str = spec("none", choices=TRACKING_BACKENDS)
    """Where runs, parameters, metrics and artifacts go: none, an MLflow tracking server, or W&B."""
    uri: Optional[str] = None
    """MLflow: the tracking URI (http://host:5000, databricks, sqlite:///...); None: MLFLOW_TRACKING_URI,
    else a SQLite store in the run directory (<run_dir>/mlflow.db). W&B: the server's base URL;
    None: WANDB_BASE_URL, else wandb.ai. Credentials never go here: they come from the environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN; WANDB_API_KEY)."""
    experiment: str = "rdistill"
    """MLflow experiment (created when missing) or W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user; None: WANDB_ENTITY, else the API key's default). MLflow ignores it."""
    run_name: Optional[str] = None
    """Name of the parent run of this pipeline run (None: the experiment's `name`)."""
    tags: Dict[str, str] = field(default_factory=dict)
    """Extra tags on the parent run (e.g. {team: distill, cluster: a100-pool})."""
    log_models: bool = False
    """Also upload model weights (the branches and the chosen merge) as artifacts: tens of GB each
    on real models, so off unless asked."""
    required: bool = False
    """Fail at preflight (one line) when the tracker is unreachable or refuses the credentials. Without
    it a tracking failure is one warning line and the pipeline goes on untracked."""
    timeout_s: float = spec(30.0, gt=0)
    """MLflow: seconds per HTTP request; W&B: seconds wandb.init may take. Bounds how long a dead
    server can hold the pipeline before the tracker disables itself."""
    retries: int = spec(2, ge=0, le=10)
    """MLflow HTTP retries per request (the client's own default backs off for minutes)."""
    poll_s: float = spec(10.0, gt=0)
    """How often the train stage reads the branches' progress files to log the loss curves live."""

    def validate(self, prefix: str) -> None:
        bad = {k: v for k, v in self.tags.items() if not isinstance(v, str)}
        if bad:
            fail(f"{prefix}tags", bad, "tag values must be strings")
        if self.backend != "none" and not self.experiment.strip():
            fail(f"{prefix}experiment", self.experiment, "name the MLflow experiment or W&B project")
