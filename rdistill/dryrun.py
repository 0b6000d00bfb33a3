"""The dry run: validate a config and print what a run would do, without starting work: the
stages and what each asks of the cluster, the models (branches, the mixture baseline, the merge
candidates, the merge search's budget and rungs, and exactly the list the evaluate stage
scores), the data and the estimates."""

from __future__ import annotations

import dataclasses
import os

from rdistill.config import ExperimentConfig, branch_train_config
from rdistill.estimates import data_plan, estimate, source_rows
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


def default_stages() -> list[str]:
    """The stages a run has when `stages` is not set (serve is not among them)."""
    field = next(f for f in dataclasses.fields(ExperimentConfig) if f.name == "stages")
    return list(field.default_factory())


def _steps(c) -> str:
    return " -> ".join(f"{s.name}={s.merge_method}(base={s.base_model}, {', '.join(m.model for m in s.models)})"
                       for s in c.steps)


def dev_prompts(cfg: ExperimentConfig) -> int | None:
    """Dev prompts per domain the merge search can use (the smallest domain's, at most
    eval.max_prompts), or None when a dev split's size is unknown."""
    sizes = [source_rows(d.dev, cfg, "dev") if d.dev else None for d in cfg.domains.values()]
    if not sizes or None in sizes:
        return None
    n = min(sizes)
    return min(n, cfg.eval.max_prompts) if cfg.eval.max_prompts else n


def search_lines(cfg: ExperimentConfig) -> list[str]:
    """The merge search's plan: its recipes, budget, rungs and refinement."""
    from rdistill.merge.search import candidate_space, rungs
    sc = cfg.merge.search
    cands = candidate_space(list(cfg.domains), sc)
    kinds: dict[str, int] = {}
    for c in cands:
        m = c.steps[-1]["merge_method"]
        kinds[m] = kinds.get(m, 0) + 1
    lines = [f"  merge search (merge:search): a budget of {sc.candidates} candidates, {len(cands)} recipes "
             f"drawn (" + ", ".join(f"{n} {m}" for m, n in kinds.items()) + f"; seed {sc.seed}), "
             f"objective {cfg.merge.objective}, floor {sc.floor}"]
    n_dev = dev_prompts(cfg)
    if n_dev is None:
        lines.append(f"      successive halving from {sc.first_prompts} dev prompts per domain, x{sc.eta} per rung "
                     "(the rungs depend on the dev split's size: set the dev sources' expected_rows to see them)")
    else:
        plan = rungs(len(cands), n_dev, sc.first_prompts, sc.eta)
        lines.append(f"      successive halving on {n_dev} dev prompts per domain x {sc.samples} samples, rungs "
                     "(dev prompts per domain x candidates): " + ", ".join(f"{k}x{n}" for k, n in plan))
    if sc.refine_rounds:
        lines.append(f"      then up to {sc.refine_rounds} refinement round(s): the choice with one branch's weight "
                     f"a step up or down (up to {2 * len(cfg.domains)} candidates a round) on the whole dev split")
    return lines


def models_lines(cfg: ExperimentConfig) -> list[str]:
    """The run's models: branches, the mixture baseline, merges, and what evaluate scores."""
    from rdistill.evaluate.targets import evaluated_models
    lines = ["models:", f"  branches (train): " + ", ".join(f"branch:{d}" for d in cfg.domains)]
    if cfg.train.mixture_baseline:
        lines.append(f"  mixture baseline (train, train.mixture_baseline): one student on all {len(cfg.domains)} "
                     "SFT sets, for as many optimizer steps as the branches together")
    else:
        lines.append("  no mixture baseline (train.mixture_baseline=false)")
    for c in cfg.merge.candidates:
        lines.append(f"  merge candidate {c.name}: {_steps(c)}")
    if cfg.merge.search.enabled:
        lines += search_lines(cfg)
    if len(cfg.merge.names()) > 1:
        lines.append(f"  the run's merge: the best of {len(cfg.merge.names())} merges on the dev split "
                     f"(objective {cfg.merge.objective}), chosen by the evaluate stage")
    models = evaluated_models(cfg)
    lines.append(f"  evaluate scores {len(models)} models: " + ", ".join(
        m + (f" ({'+'.join(s)})" if s != ("test",) else "") for m, s in models))
    return lines


def format_plan(cfg: ExperimentConfig, where: str, have: dict) -> list[str]:
    run = RunDir(cfg.run_dir)
    st = status(cfg, run)
    extra = [s for s in cfg.stages if s not in default_stages()]
    lines = [f"rdistill plan: run '{cfg.name}' in {run.root} on {cfg.device}",
             f"stages: {', '.join(cfg.stages)}"
             + (f" ({', '.join(extra)} off by default, turned on here)" if extra else ""),
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
    for d in cfg.domains:
        tc = branch_train_config(cfg, d)
        lines.append(f"  train {d}: epochs={tc.epochs} lr={tc.lr} scheduler={tc.scheduler} "
                     f"grad_accum={tc.grad_accum} packing={tc.packing}")
    lines += models_lines(cfg)
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
