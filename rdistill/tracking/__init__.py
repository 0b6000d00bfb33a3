"""Experiment tracking of a pipeline run in MLflow or Weights & Biases (`tracking=` in the config).

One parent run per pipeline run (per run directory), a nested run per stage that runs (none for
a stage skipped as current), and under those a run per train branch and per merge candidate.
Parameters: the stage's config slice (`Stage.config_slice`, what its cache key hashes).
Metrics: the figures the stage already computes (its manifest's result, the verify funnels, the
live train loss curves, merge time and memory, pass@1 with its standard error). Artifacts: the
stage manifests and the report. See README.md, "Experiment tracking".

Tracking never costs pipeline work: a failing tracker warns once and disables itself;
`tracking.required=true` instead fails at preflight with one line.

    with tracking.pipeline_run(cfg, run):        # rdistill.pipeline.run_pipeline
        tracking.stage_started(stage, slice)      # rdistill.pipeline.run_stage
        tracking.stage_finished(stage, manifest, stage_dir)
    h = tracking.current().child("merge", name, params); h.log({...}); h.end()
    tail = tracking.tail_progress("train", {dom: (progress_file, params)}); ...; tail.stop(results)
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rdistill.tracking.tailer import ProgressTailer, tail_progress
from rdistill.tracking.tracker import RunHandle, Tracker

_current = Tracker()  # disabled until a pipeline run starts one


def make_backend(cfg, run_dir: Path):
    """The backend object for `cfg.tracking` (no network, no import of the client yet)."""
    t = cfg.tracking
    if t.backend == "mlflow":
        from rdistill.tracking.mlflow_backend import MlflowBackend
        return MlflowBackend(t, run_dir)
    if t.backend == "wandb":
        from rdistill.tracking.wandb_backend import WandbBackend
        return WandbBackend(t, run_dir)
    return None


def current() -> Tracker:
    return _current


def start(cfg, run) -> Tracker:
    """Make the tracker of this pipeline run current (runs open lazily, on the first stage)."""
    global _current
    t = cfg.tracking
    params = {"name": cfg.name, "run_dir": str(run.root), "stages": list(cfg.stages), "device": cfg.device,
              "seed": cfg.seed, "domains": sorted(cfg.domains), "teacher": cfg.teacher.model,
              "student": cfg.student.base}
    _current = Tracker(make_backend(cfg, run.root), run.root, run_name=t.run_name or cfg.name,
                       parent_params=params, tags={"rdistill.run_dir": str(run.root), **t.tags},
                       log_models=t.log_models, poll_s=t.poll_s)
    return _current


@contextmanager
def pipeline_run(cfg, run) -> Iterator[Tracker]:
    """The parent run around the stages: ended finished, failed when a stage raises, killed on
    Ctrl-C (how a blocking serve stage ends)."""
    global _current
    tracker = start(cfg, run)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status, Path(run.root) / "config.json")
        _current = Tracker()


def stage_started(stage: str, params: dict) -> None:
    _current.stage_started(stage, params)


def stage_finished(stage: str, manifest: dict, stage_dir: Path) -> None:
    _current.stage_finished(stage, manifest, stage_dir)


def check_tracking(cfg) -> None:
    """Preflight: with `tracking.required=true`, the tracker answers and accepts the credentials,
    else one-line ResourceError. Without it nothing is checked here (a failure later warns once)."""
    t = cfg.tracking
    if t.backend == "none" or not t.required:
        return
    from rdistill.errors import ResourceError
    backend = make_backend(cfg, Path(cfg.run_dir).absolute())
    where = getattr(backend, "uri", None) or getattr(backend, "base_url", "")
    try:
        backend.check()
    except ImportError as e:
        raise ResourceError(f"tracking={t.backend} needs {e.name or t.backend}: pip install 'rdistill[tracking]'"
                            ) from None
    except Exception as e:  # noqa: BLE001 (unreachable server, refused credentials, bad URI)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ResourceError(f"tracking.required=true but {t.backend} at {where} is unusable ({type(e).__name__}: "
                            f"{first}): start the server, fix tracking.uri or the credentials in the environment, "
                            "or set tracking.required=false to run untracked") from None


__all__ = ["ProgressTailer", "RunHandle", "Tracker", "check_tracking", "current", "make_backend",
           "pipeline_run", "stage_finished", "stage_started", "start", "tail_progress"]
