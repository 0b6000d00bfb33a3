"""Run one merge step as tasks that stream tensors from the inputs' shards to the output's.

The driver reads only headers: it checks the inputs, lays out the output shards (created at full
size with their headers), cuts a big tensor into blocks of rows (so every core works on an
embedding matrix; two passes for TIES and Fusion, see two_pass.py), packs the rest into work units
of similar byte size, and runs one task per unit (rdistill.merge.work), at most `num_tasks` at a
time: Ray tasks on a cluster, else threads of this process (no Ray start-up). A task reads each
tensor from every input, merges it, checks it is finite and writes it at its offset in its shard,
so a worker holds a few tensors at a time whatever the model size. The output directory is built
under a temporary name and renamed when complete; config, tokenizer, chat template and
generation config come from the base model (else the first model), as mergekit does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from rdistill.parallel import run_at_most
from rdistill.merge.budget import item_bytes, resolve_budget, rows_that_fit, too_small
from rdistill.merge.inputs import InputModel, check_inputs, load_input
from rdistill.merge.methods import METHODS
from rdistill.merge.plan import MergeStep, PlanError, check_slices, tensor_parameters
from rdistill.merge.output import ST_DTYPE, MergeError, check_loads, finish_dir, write_config
from rdistill.merge.st_io import InputError, OutTensor, TensorLoc, create_shards, layout_shards
from rdistill.merge.work import (FLOAT_RANK, Unit, UnitTensor, compute_dtype, merge_unit, row_block,
                                 row_blocks)


@dataclass
class Options:
    shard_size: int = 1 << 30
    """Bytes per output shard."""
    num_tasks: Optional[int] = None
    """Tasks in flight (None: the cluster's CPUs)."""
    seed: int = 0
    """Seed of the random methods (dare_*) and of Arcee Fusion's quantile sample."""
    unsafe_truncate_embeddings: bool = False
    device: str = "cpu"
    """cpu | gpu: gpu tasks ask Ray for a GPU share and compute on it."""
    check_load: bool = True
    """When the merge changes the layout (embeddings cut to a common vocabulary), build the
    output's architecture from its config on the meta device and check every parameter is there
    with its shape, so it loads in transformers. Otherwise the output has the donor's tensors,
    shapes and config (dtype aside) and loads exactly when the donor does: no check (importing
    transformers' model classes takes seconds, longer than a merge of a small model)."""
    max_memory: Optional[int] = None
    """Bytes the merge's work in flight may hold together (inputs, outputs and the methods'
    buffers, estimated per unit by rdistill.merge.budget; None: half the node's available
    memory). A tensor too big for it is merged in row blocks that fit; units start only when
    they fit beside the running ones."""
    unit_bytes: Optional[int] = None
    """Input bytes per task (None: about a quarter of an even share per task, 4-256 MiB)."""
    block_bytes: int = 32 << 20
    """Output bytes above which a tensor is merged in blocks of rows spread over the tasks
    (element-wise methods, TIES in 16 bits, Arcee Fusion): an embedding matrix, most of a small
    model, is then merged by every core instead of one."""
    in_process: bool = False
    """Merge in this process's threads instead of Ray tasks (one machine, no cluster): no Ray
    start-up and no worker processes' memory, which dominate a merge of a few GB."""
    stats: Any = None
    """How input statistics are collected for steps that do not say (a MergeStatsConfig; None:
    its defaults)."""
    stats_dir: Optional[str] = None
    """Where input statistics (regmean, regmean_plusplus) are written and reused (None:
    regmean-stats beside the output folder)."""
    stats_from: list = field(default_factory=list)
    """Other folders where complete statistics may already be (copied from there when found)."""
    data_for: Optional[Callable[[str], Optional[str]]] = None
    """A model reference's domain data, for models whose step gives none (the merge stage: a
    branch's verified SFT set)."""


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


def _out_dtype(step: MergeStep, locs: list[TensorLoc]) -> str:
    if not all(loc.dtype in FLOAT_RANK for loc in locs):
        return locs[0].dtype
    if step.out_dtype or step.dtype:
        return ST_DTYPE[step.out_dtype or step.dtype]
    best = max(locs, key=lambda loc: FLOAT_RANK[loc.dtype]).dtype
    return "F32" if {loc.dtype for loc in locs} == {"BF16", "F16"} else best


# Methods whose result at an entry depends only on the inputs at that entry: any block of rows
# merges on its own (the two-pass methods need a statistic of the whole tensor first). Every
# other method (model_stock, slerp, the spectral ones, whose SVD needs the whole matrix) merges
# each tensor whole in one task.
ELEMENTWISE = {"linear", "task_arithmetic"}


def _merge_in_threads(units: list, costs: list[int], args: tuple, use_gpu: bool, width: int,
                      budget: int) -> list[dict]:
    """The units (their peak bytes in costs) on threads of this process: reads, torch ops and
    pwrite release the GIL. One torch thread per pool thread, so `width` threads do not
    oversubscribe the cores."""
    import torch
    keep = torch.get_num_threads()
    torch.set_num_threads(max(1, keep // width))
    try:
        return run_at_most(width, [lambda u=u: merge_unit(*args, u, use_gpu) for u in units], costs=costs,
                           budget=budget, name="merge")
    finally:
        torch.set_num_threads(keep)


def _units(items: list, target: int) -> list[Unit]:
    units, size = [Unit()], 0
    for item in items:
        n = sum(loc.nbytes for loc in item.locs)
        if units[-1].tensors and size + n > target:
            units.append(Unit())
            size = 0
        units[-1].tensors.append(item)
        size += n
    return units


def _blocks(t: UnitTensor, method: str, dtype: Optional[str], opts: "Options", width: int,
            budget: int) -> tuple[list[UnitTensor], int, bool]:
    """(pieces, the least budget any cut of `t` needs, whether it can be cut). A big tensor of
    a method that can merge it by blocks of rows, as blocks: a multiple of `width` above
    block_bytes (every task gets a share of it), and always small enough for the budget;
    otherwise [t]."""
    from rdistill.merge import two_pass
    need = item_bytes(method, dtype, t)
    phase = None
    if len(t.out.shape) >= 1 and t.out.shape[0] >= 2 and all(loc.dtype in FLOAT_RANK for loc in t.locs):
        if method in ELEMENTWISE:
            phase = "merge"
        elif two_pass.handles(method, compute_dtype(dtype, t.locs), t.shared):
            phase = "stats"
    if phase is None:
        return [t], need, False
    least = item_bytes(method, dtype, row_block(t, 0, 1))
    if t.out.nbytes <= opts.block_bytes and need <= budget:
        return [t], least, True
    rows = t.out.shape[0]
    count = width * -(-t.out.nbytes // (opts.block_bytes * width)) if t.out.nbytes > opts.block_bytes else 1
    count = min(rows, max(count, -(-rows // max(1, rows_that_fit(method, dtype, t, budget)))))
    return [replace(b, phase=phase) for b in row_blocks(t, count)], least, True


def plan_work(items: list[UnitTensor], step: MergeStep, opts: "Options", width: int,
              budget: int) -> tuple[list[UnitTensor], list[UnitTensor], list[UnitTensor]]:
    """(two-pass blocks' first pass, blocks merged in one pass, small tensors): every piece fits
    `budget`, or BudgetError, before any work, names the smallest budget that fits them all."""
    small, blocks, first = [], [], []
    least, what = 0, ""
    for it in items:
        parts, need, by_rows = _blocks(it, step.merge_method, step.dtype, opts, width, budget)
        if need > least:
            least, what = need, (f"one row of {it.out.name}" if by_rows else
                                 f"{it.out.name} ({step.merge_method} merges a tensor whole)")
        if len(parts) == 1 and parts[0].phase == "merge":
            small.append(it)
        else:
            (first if parts[0].phase == "stats" else blocks).extend(parts)
    if least > budget:
        raise too_small(budget, least, what)
    return first, blocks, small


def _num_layers(models: list[InputModel]) -> int:
    cfg = models[0].config
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    return int(n) if n else 0


def _in_background(fn: Callable[[], None]) -> Callable[[], None]:
    """Start fn in a daemon thread; the returned wait() re-raises its error."""
    import threading
    err: list = []

    def body() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 (re-raised by wait)
            err.append(e)
    th = threading.Thread(target=body, name="merge-check", daemon=True)
    th.start()

    def wait() -> None:
        th.join()
        if err:
            raise err[0]
    return wait


def _runner(opts: "Options", width: int, budget: int, args: tuple, use_gpu: bool) -> Callable[[list], list]:
    """Runs a list of units to completion, in order, each started when it fits the budget
    beside those running (at most `width` at once): in this process's threads, or as Ray tasks."""
    def costs(units: list) -> list[int]:  # a unit merges its tensors one after another: its largest
        return [max(item_bytes(args[0], args[1], t) for t in u.tensors) for u in units]
    if opts.in_process:
        return lambda units: _merge_in_threads(units, costs(units), args, use_gpu, width, budget)
    import ray

    from rdistill.topology import merge_task_options
    task = ray.remote(merge_unit).options(**merge_task_options(opts.device))
    return lambda units: run_at_most(width, [lambda u=u: ray.get(task.remote(*args, u, use_gpu)) for u in units],
                                     costs=costs(units), budget=budget, name="merge")


def _merge_all(work: tuple, step: MergeStep, target: int, run: Callable[[list], list]) -> list[dict]:
    """Every planned piece merged. Blocks of two-pass methods first measure, then merge with
    the combined statistic. Small tensors are packed into units of about `target` input bytes;
    the biggest units go first."""
    from rdistill.merge import two_pass
    first, blocks, small = work
    method = step.merge_method
    results = run([Unit([b]) for b in first]) if first else []
    stats = {k: v for r in results for k, v in r["stats"].items()}
    for name in dict.fromkeys(b.out.name for b in first):
        mine = [b for b in first if b.out.name == name]
        ctx = two_pass.reduce(method, [stats[(name, b.block)] for b in mine], mine[0].per, mine[0].numel)
        blocks += [replace(b, phase="apply", ctx=c) for b, c in zip(mine, ctx)]
    units = [Unit([b]) for b in blocks] + _units(small, target)
    units.sort(key=lambda u: -sum(loc.nbytes for t in u.tensors for loc in t.locs))
    return results + run(units)


def _stats_params(step: MergeStep, models: list[InputModel], opts: "Options", out_dir: Path,
                  log: Callable[[str], None]) -> dict:
    """The shared parameters that point a statistics method's tensors at their statistics,
    collected first when missing ({} for the other methods)."""
    from rdistill.merge.methods import METHODS
    if not METHODS[step.merge_method].stats:
        return {}
    from rdistill.merge import stats
    from rdistill.merge.regmean import STATS_KEY
    where = Path(opts.stats_dir) if opts.stats_dir else out_dir.parent / "regmean-stats"
    return {STATS_KEY: stats.ensure(step, models, opts, where, log)}


def _items(step: MergeStep, models: list[InputModel], shapes: dict, opts: Options,
           stats: dict) -> tuple[list[OutTensor], dict, list[UnitTensor]]:
    """The output's shard layout and one work item per output tensor, its parameters resolved."""
    donor = models[0]
    order = sorted(donor.tensors, key=lambda n: (donor.tensors[n].file, donor.tensors[n].start))
    specs = [(n, shapes[n], _out_dtype(step, [m.tensors[n] for m in models])) for n in order]
    placed, headers = layout_shards(specs, opts.shard_size)
    layers = _num_layers(models)
    check_slices(step, layers)
    check = METHODS[step.merge_method].check
    items = []
    for out in placed:
        locs = [m.tensors[out.name] for m in models]
        rows = shapes[out.name][0] if any(loc.shape != shapes[out.name] for loc in locs) else None
        shared, per = tensor_parameters(step, out.name, layers)
        shared.update(stats)
        problem = check and out.dtype in FLOAT_RANK and check(out.name, tuple(shapes[out.name]), shared, per)
        if problem:  # e.g. a rank larger than the layer: refused before any work
            raise PlanError(f"{step.name}: {problem}")
        items.append(UnitTensor(out, locs, rows, shared, per, _tensor_seed(opts.seed, out.name)))
    return placed, headers, items


def plan_peak(step: MergeStep, resolve: Callable[[str], str], opts: Options, width: int) -> tuple[int, int]:
    """(the most bytes the step's work can hold at once, the budget), from the inputs' headers
    alone: the dry run's figure. Raises BudgetError as the merge would."""
    models = [load_input(r, resolve(r)) for r in step.inputs]
    shapes, _ = check_inputs(models, opts.unsafe_truncate_embeddings)
    _, _, items = _items(step, models, shapes, opts, {})
    budget = resolve_budget(opts.max_memory)
    first, blocks, small = plan_work(items, step, opts, width, budget)
    costs = sorted((item_bytes(step.merge_method, step.dtype, t) for t in first + blocks + small), reverse=True)
    return min(budget, sum(costs[:width])), budget


def run_step(step: MergeStep, out_dir: str | Path, resolve: Callable[[str], str] = lambda r: r,
             opts: Optional[Options] = None, log: Callable[[str], None] = print) -> dict:
    """Merge one step into out_dir (replaced when complete). Returns counts and timings."""
    opts = opts or Options()
    t0 = time.time()
    out_dir = Path(out_dir).absolute()
    refs = step.inputs
    models = [load_input(r, resolve(r)) for r in refs]
    shapes, vocab = check_inputs(models, opts.unsafe_truncate_embeddings)
    stats = _stats_params(step, models, opts, out_dir, log)
    donor = models[0]  # base first, else the first listed model (mergekit's donor)
    placed, headers, items = _items(step, models, shapes, opts, stats)
    if opts.in_process:
        cpus = os.cpu_count() or 1
    else:
        import ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
    width = opts.num_tasks or cpus
    budget = resolve_budget(opts.max_memory)
    work = plan_work(items, step, opts, width, budget)  # a budget too small fails here, before any work
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        create_shards(tmp, headers)
        write_config(tmp, donor, placed, vocab)
        checked = _in_background(lambda: check_loads(tmp, placed, str(out_dir))) \
            if opts.check_load and vocab is not None else None
        total_in = sum(loc.nbytes for it in items for loc in it.locs)
        target = opts.unit_bytes or min(256 << 20, max(4 << 20, total_in // (4 * width)))
        use_gpu = opts.device == "gpu"
        run = _runner(opts, width, budget, (step.merge_method, step.dtype, str(tmp)), use_gpu)
        results = _merge_all(work, step, target, run)
        bad = [n for r in results for n in r["nonfinite"]]
        if bad:
            raise MergeError(f"{step.name}: {len(bad)} merged tensor(s) are not finite, e.g. {bad[:3]}; "
                             "check the inputs and parameters (a weight sum near 0 with normalize?)")
        finish_dir(tmp, donor, placed)
        (tmp / "rdistill_merge.json").write_text(json.dumps(
            {"merge_method": step.merge_method, "base_model": step.base_model, "dtype": step.dtype,
             "out_dtype": step.out_dtype, "parameters": step.parameters, "seed": opts.seed,
             "models": [{"model": m.model, "parameters": m.parameters, **({"data": m.data} if m.data else {})}
                        for m in step.models],
             **({"slices": [dataclasses.asdict(sl) for sl in step.slices]} if step.slices else {}),
             "resolved": {r: m.path for r, m in zip(refs, models)}}, indent=2, default=str))
        if checked:
            checked()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wall = time.time() - t0
    out = {"tensors": len(placed), "bytes_written": sum(t.nbytes for t in placed), "bytes_read": total_in,
           "shards": len(headers), "tasks": len(results), "seconds": round(wall, 3),
           "max_task_peak_rss_mb": round(max(r["peak_rss_mb"] for r in results), 1),
           "workers": len({r["pid"] for r in results}),
           # each worker's peak (torch's own footprint included); their sum bounds the merge's memory
           "sum_worker_peak_rss_mb": round(sum({r["pid"]: r["peak_rss_mb"] for r in results}.values()), 1)}
    log(f"merge {step.name} ({step.merge_method}): {out['tensors']} tensors, "
        f"{out['bytes_written'] / 1e6:.1f} MB in {wall:.1f}s over {out['tasks']} task(s)")
    return out


__all__ = ["InputError", "MergeError", "Options", "run_step", "check_loads"]
