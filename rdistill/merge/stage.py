"""The merge stage: every candidate of `cfg.merge`, its steps in order, as streaming Ray tasks.

Layout: `<run_dir>/merge/<candidate>/<step>/` per step; `<candidate>/final` is the last step (the
step itself when it is named `final`, else a relative symlink to it); `selection.json` names the
first candidate (run-dir relative), which the evaluate stage may replace by its dev-split choice.
References in steps: `branch:<domain>`, `base`, paths, and `merge:<candidate>/<step>` or
`merge:<candidate>` for outputs of this stage (resolved inside the folder being built, since it
is only renamed into place after the stage returns).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rdistill import tracking
from rdistill.config import ConfigError, to_dict
from rdistill.log import log
from rdistill.merge.execute import Options, run_step
from rdistill.merge.plan import PlanError, step_from_config
from rdistill.rundir import write_json_atomic
from rdistill.stage_api import Stage


def _resolver(ctx, cand: str, done: dict[str, Path]):
    def resolve(ref: str) -> str:
        if ref.startswith("merge:"):
            c, _, s = ref[len("merge:"):].partition("/")
            key = f"{c}/{s or 'final'}"
            if key in done:
                return str(done[key])
            if (ctx.out / key).exists():
                return str((ctx.out / key).resolve())
            raise ConfigError(f"merge candidate {cand}: {ref} refers to a step that has not run yet; "
                              "list steps (and candidates) in the order they depend on each other")
        return ctx.model(ref)
    return resolve


def _domain_data(ctx):
    """A model reference's domain data: a branch's verified SFT set (what it was trained on)."""
    def data_for(ref: str):
        kind, _, domain = ref.partition(":")
        return str(ctx.run.stage_dir("verify") / f"{domain}.jsonl") if kind == "branch" and domain else None
    return data_for


def _steps(ctx, data_for) -> dict[str, list]:
    """Every candidate's steps, checked before any of them runs (plans, and the domain data of
    the methods that need it)."""
    from rdistill.merge.stats import check_data
    out = {}
    for cand in ctx.cfg.merge.candidates:
        names = [s.name for s in cand.steps]
        if len(set(names)) != len(names) or "final" in names[:-1]:
            raise ConfigError(f"merge.candidates.{cand.name}.steps: names must be unique and only the "
                              f"last may be 'final', got {names}")
        out[cand.name] = []
        for i, step_cfg in enumerate(cand.steps):
            try:
                step = step_from_config(step_cfg)
                check_data([step], data_for)
            except PlanError as e:
                raise ConfigError(f"merge.candidates.{cand.name}.steps[{i}]: {e}") from None
            out[cand.name].append(step)
    return out


def run(ctx) -> dict:
    cfg = ctx.cfg
    if not cfg.merge.names():
        raise ConfigError("merge.candidates is empty and merge.search is off: configure a candidate "
                          "(e.g. merge=toy_fusion) or merge.search.enabled=true")
    # RegMean's statistics: rendered with the branches' training template, kept in merge/stats and
    # reused from the previous merge folder when their inputs did not change
    stats = dataclasses.replace(cfg.merge.stats, chat_template=cfg.merge.stats.chat_template or cfg.train.chat_template)
    data_for = _domain_data(ctx)
    opts = Options(shard_size=cfg.merge.shard_size_mb << 20, num_tasks=cfg.merge.num_tasks,
                   max_memory=int(cfg.merge.max_memory_gb * (1 << 30)) if cfg.merge.max_memory_gb else None,
                   seed=cfg.seed, device=cfg.device, stats=stats, stats_dir=str(ctx.out / "stats"),
                   stats_from=[str(ctx.run.stage_dir("merge") / "stats")], data_for=data_for)
    result: dict = {"candidates": {}}
    done: dict[str, Path] = {}
    steps_of = _steps(ctx, data_for)
    for cand in cfg.merge.candidates:
        names = [s.name for s in cand.steps]
        counts = {}
        trk = tracking.current().child("merge", cand.name, to_dict(cand))  # time and memory per step
        for step in steps_of[cand.name]:
            dest = ctx.out / cand.name / step.name
            counts[step.name] = run_step(step, dest, _resolver(ctx, cand.name, done), opts, log.info)
            done[f"{cand.name}/{step.name}"] = dest
            trk.log({step.name: counts[step.name]})
        final = ctx.out / cand.name / "final"
        if names[-1] != "final":
            os.symlink(names[-1], final)  # relative: survives the stage folder's rename
        done[f"{cand.name}/final"] = final
        result["candidates"][cand.name] = counts
        trk.end()
    steps = [c for cand in result["candidates"].values() for c in cand.values()]
    if cfg.merge.search.enabled:
        from rdistill.merge.search_run import run_search
        result.update(run_search(ctx, opts, ctx.model))
    first = cfg.merge.names()[0]
    write_json_atomic(ctx.out / "selection.json", {"candidate": first, "path": f"merge/{first}/final"})
    # until evaluate picks on dev (refs.merge_selection): named so the log does not read as the choice
    result.update(default_until_dev=first, steps=len(steps), tensors_merged=sum(c["tensors"] for c in steps),
                  bytes_written=sum(c["bytes_written"] for c in steps),
                  seconds=round(sum(c["seconds"] for c in steps), 3))
    return result



def uses_stats(cfg) -> bool:
    """Whether a candidate or the search merges with a method that reads domain data."""
    from rdistill.merge.methods import METHODS
    methods = {s.merge_method for c in cfg.merge.candidates for s in c.steps}
    if cfg.merge.search.enabled:
        methods |= set(cfg.merge.search.methods)
    return any(METHODS[m].stats for m in methods if m in METHODS)


def _inputs(cfg) -> tuple[str, ...]:
    """RegMean reads the branches' SFT sets (verify/<domain>.jsonl) besides the branches."""
    return ("train", "verify") if uses_stats(cfg) else ("train",)


def _search_reads(cfg) -> dict:
    """The merge search scores candidates on dev: what evaluation reads, it reads too. RegMean's
    rows are rendered with the training chat template."""
    out = {"stats_chat_template": cfg.train.chat_template} if uses_stats(cfg) else {}
    if not cfg.merge.search.enabled:
        return out
    return {**out, "search_scoring": {"eval": to_dict(cfg.eval), "sandbox": to_dict(cfg.verify.sandbox),
                               "device": cfg.device,
                               "domains": {n: {k: to_dict(getattr(d, k)) for k in
                                               ("kind", "dev", "system_prompt", "instruction_suffix", "language")}
                                           for n, d in sorted(cfg.domains.items())}}}


STAGE = Stage("merge", run, reads=("merge", "seed", "student"), inputs=_inputs, extra=_search_reads,
              engine="eval.engine", warm=True)
