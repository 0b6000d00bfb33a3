"""`merge(plan, out_dir)`: the Python API, usable without Hydra or a run directory.

A plan of several steps is a chain: a step refers to an earlier one as `merge:<name>` (or just
`<name>`), as the reference recipe does (fusion of math onto science, then of that onto code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from rdistill.merge.execute import Options, run_step
from rdistill.merge.plan import PlanError, load_plan


def chain_resolver(done: dict[str, Path], fallback: Callable[[str], str]) -> Callable[[str], str]:
    """References to earlier steps (`merge:<name>` or `<name>`) first, then `fallback`."""
    def resolve(ref: str) -> str:
        key = ref[len("merge:"):] if ref.startswith("merge:") else ref
        if key in done:
            return str(done[key])
        return fallback(ref)
    return resolve


def merge(plan: Any, out_dir: str | Path, *, resolve: Optional[Callable[[str], str]] = None,
          options: Optional[Options] = None, log: Callable[[str], None] = print,
          stats: Optional[list] = None, intermediate_dir: str | Path | None = None, **kw) -> Path:
    """Run a merge plan; returns the output directory of its last step.

    One step writes to out_dir; a chain writes each step to out_dir/<step name>, or, given
    `intermediate_dir` (mergekit-multi's layout), its last step to out_dir and the others to
    intermediate_dir/<step name>. `resolve` maps
    model references to local paths (default: unchanged, relative to the current directory).
    Runs on the connected Ray cluster's tasks, or in this process's threads when Ray is not
    initialized (one machine: no cluster start-up). Keyword arguments set `Options` fields
    (seed, shard_size, num_tasks, unsafe_truncate_embeddings, device, in_process, ...).
    `stats`, when given, receives each step's counts and timings."""
    import dataclasses
    import sys

    from rdistill.merge.stats import check_data
    steps = load_plan(plan)
    opts = dataclasses.replace(options or Options(), **kw)
    check_data(steps, opts.data_for)  # a step that needs domain data fails before any step runs
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise PlanError(f"step names must be unique in a chain, got {names}")
    out_dir = Path(out_dir).absolute()
    ray = sys.modules.get("ray")  # not imported: not initialized either (and no second of import)
    if ray is None or not ray.is_initialized():
        opts.in_process = True
    done: dict[str, Path] = {}
    fallback = resolve or (lambda r: str(Path(r).expanduser().absolute()))
    for step in steps:
        if len(steps) == 1 or (intermediate_dir is not None and step is steps[-1]):
            dest = out_dir
        else:
            dest = Path(intermediate_dir or out_dir).absolute() / step.name
        counts = run_step(step, dest, chain_resolver(done, fallback), opts, log)
        if stats is not None:
            stats.append(counts)
        done[step.name] = dest
    return done[steps[-1].name]
