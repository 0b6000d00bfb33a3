"""The dry run: validate a config and print what a run would do, without starting work."""

from __future__ import annotations

import os

from rdistill.config import ExperimentConfig, branch_train_config
from rdistill.estimates import data_plan, estimate
from rdistill.pipeline import status
from rdistill.rundir import RunDir
from rdistill.topology import fits, local_num_cpus, plan


def cluster_resources(cfg: ExperimentConfig) -> tuple[str, dict]:
    """The connected cluster's resources, or this machine's when no cluster is configured
    (a dry run never starts Ray)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray
        ray.init(address=address, log_to_driver=False)
        try:
            return f"cluster at {address}", dict(ray.cluster_resources())
        finally:
            ray.shutdown()
    gpus = 0
    try:
        import torch
        gpus = torch.cuda.device_count()
    except Exception:
        pass
    return "this machine (local cluster)", {"CPU": local_num_cpus(cfg.ray), "GPU": gpus}


def format_plan(cfg: ExperimentConfig, where: str, have: dict) -> list[str]:
    run = RunDir(cfg.run_dir)
    st = status(cfg, run)
    lines = [f"rdistill plan: run '{cfg.name}' in {run.root} on {cfg.device}",
             f"teacher: {cfg.teacher.name} ({cfg.teacher.backend}: {cfg.teacher.model})",
             f"student base: {cfg.student.base}",
             f"domains: " + ", ".join(f"{n} ({d.kind})" for n, d in cfg.domains.items()),
             f"resources of {where}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(have.items())
                                                   if k in ("CPU", "GPU", "memory") or v)]
    problems = []
    for p in plan(cfg):
        if p.stage == "generate" and cfg.teacher.backend == "dataset":
            p.notes = [f"no model runs: existing {cfg.teacher.name} traces are imported (see data: below)"]
        need = ", ".join(f"{k}={v:g}" for k, v in p.resources.items())
        lines.append(f"  [{p.stage}] {st.get(p.stage, '')}; asks for {need}")
        lines += [f"      {n}" for n in p.notes]
        for miss in fits(p.resources, have):
            problems.append(f"{p.stage}: {miss}")
    for c in cfg.merge.candidates:
        steps = " -> ".join(f"{s.name}={s.merge_method}(base={s.base_model}, "
                            f"{', '.join(m.model for m in s.models)})" for s in c.steps)
        lines.append(f"  merge candidate {c.name}: {steps}")
    for d in cfg.domains:
        tc = branch_train_config(cfg, d)
        lines.append(f"  train {d}: epochs={tc.epochs} lr={tc.lr} scheduler={tc.scheduler} "
                     f"grad_accum={tc.grad_accum} packing={tc.packing}")
    lines += data_plan(cfg)
    lines += estimate(cfg)
    if problems:
        lines.append("does not fit " + where + ":")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append("fits " + where)
    return lines


def print_plan(cfg: ExperimentConfig) -> None:
    where, have = cluster_resources(cfg)
    print("\n".join(format_plan(cfg, where, have)))
