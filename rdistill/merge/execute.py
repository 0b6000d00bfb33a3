"""Run one merge step as Ray tasks that stream tensors from the inputs' shards to the output's.

The driver reads only headers: it checks the inputs, lays out the output shards (created at full
size with their headers), cuts the tensor list into work units of similar byte size and submits
one Ray task per unit, at most `num_tasks` at a time. A task reads each tensor of its unit from
every input, merges it, checks it is finite and writes it at its offset in its shard, so a
worker holds a few tensors at a time whatever the model size. The output directory is built
under a temporary name and renamed when complete; config, tokenizer, chat template and
generation config come from the base model (else the first model), as mergekit does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from rdistill.errors import RdistillError
from rdistill.parallel import run_at_most
from rdistill.merge.inputs import InputModel, check_inputs, load_input
from rdistill.merge.plan import MergeStep, tensor_parameters
from rdistill.merge.st_io import (InputError, OutTensor, TensorLoc, create_shards, layout_shards,
                                  write_index)

COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
          "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
          "generation_config.json"]
_FLOAT_RANK = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}
_NAME = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class MergeError(RdistillError):
    """A merge produced a bad result (non-finite tensors, a model that does not load)."""


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
    """Build the output's architecture from its config (on the meta device) and check every
    parameter is present with its shape, so the output loads in transformers."""
    unit_bytes: Optional[int] = None
    """Input bytes per task (None: about a quarter of an even share per task, 4-256 MiB)."""
    in_process: bool = False
    """Merge in this process's threads instead of Ray tasks (one machine, no cluster): no Ray
    start-up and no worker processes' memory, which dominate a merge of a few GB."""


@dataclass
class UnitTensor:
    """One output tensor's work: where it goes, where its inputs are, and its parameters."""
    out: OutTensor
    locs: list
    """The inputs' TensorLocs, in the method's order (base first)."""
    rows: Optional[int]
    """Rows to keep of embeddings of different vocab sizes (None: all)."""
    shared: dict
    per: list
    """One parameter dict per non-base model."""
    seed: int


@dataclass
class Unit:
    tensors: list = field(default_factory=list)
    """UnitTensors merged by one task."""


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


def _out_dtype(step: MergeStep, locs: list[TensorLoc]) -> str:
    if not all(loc.dtype in _FLOAT_RANK for loc in locs):
        return locs[0].dtype
    if step.out_dtype or step.dtype:
        return _NAME[step.out_dtype or step.dtype]
    best = max(locs, key=lambda loc: _FLOAT_RANK[loc.dtype]).dtype
    return "F32" if {loc.dtype for loc in locs} == {"BF16", "F16"} else best


# Methods whose result at an entry depends only on the inputs at that entry: big tensors are
# merged in blocks of rows, so a worker never holds whole copies of an embedding matrix. TIES in
# 16-bit dtypes is merged in blocks too, in two passes (rdistill.merge.ties_stream).
ELEMENTWISE = {"linear", "task_arithmetic"}
BLOCK_BYTES = 64 << 20


def _row_blocks(out: OutTensor, locs: list[TensorLoc], rows: Optional[int], split: bool):
    """(out, locs, rows) pieces covering the tensor: the whole of it, or blocks of rows."""
    if not split or len(out.shape) < 1 or out.shape[0] < 1:
        yield out, locs, rows
        return
    n = out.shape[0]
    step = max(1, n * BLOCK_BYTES // max(1, out.nbytes))
    o_row = out.nbytes // n
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        shape = (r1 - r0, *out.shape[1:])
        yield (replace(out, shape=shape, start=out.start + r0 * o_row, nbytes=(r1 - r0) * o_row),
               [replace(loc, shape=shape, start=loc.start + r0 * (loc.nbytes // loc.shape[0]),
                        nbytes=(r1 - r0) * (loc.nbytes // loc.shape[0])) for loc in locs], None)


def _merge_in_threads(units: list, args: tuple, use_gpu: bool, width: int) -> list[dict]:
    """The units on a thread pool of this process: reads, torch ops and pwrite release the GIL.
    One torch thread per pool thread, so `width` threads do not oversubscribe the cores."""
    import torch
    keep = torch.get_num_threads()
    torch.set_num_threads(max(1, keep // width))
    try:
        return run_at_most(width, [lambda u=u: merge_unit(*args, u, use_gpu) for u in units], name="merge")
    finally:
        torch.set_num_threads(keep)


class _TensorIO:
    """One task's reads and writes: open-file caches, the compute device and dtype, and the
    tensors that came out non-finite."""

    def __init__(self, out_dir: str, dtype: Optional[str], use_gpu: bool):
        import torch
        self.out_dir, self.dtype = out_dir, dtype
        self.dev = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.rh: dict = {}
        self.wh: dict = {}
        self.bad: list[str] = []

    def load(self, locs: list, rows: Optional[int]) -> list:
        """The inputs' tensors, cut to `rows`, on the device in the compute dtype (the step's,
        else the inputs' promoted dtype, as mergekit does)."""
        import torch

        from rdistill.merge.st_io import read_tensor
        xs = [read_tensor(loc, self.rh) for loc in locs]
        if rows is not None:
            xs = [x.narrow(0, 0, rows) for x in xs]
        if all(x.is_floating_point() for x in xs):
            target = getattr(torch, self.dtype) if self.dtype else xs[0].dtype
            if not self.dtype:
                for x in xs[1:]:
                    target = torch.promote_types(target, x.dtype)
            xs = [x.to(device=self.dev, dtype=target) for x in xs]
        return xs

    def write(self, out: OutTensor, y) -> None:
        import torch

        from rdistill.merge.st_io import ST_DTYPES, write_tensor
        y = y.to(device="cpu", dtype=ST_DTYPES[out.dtype])
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            self.bad.append(out.name)
        write_tensor(self.out_dir, out, y, self.wh)

    def close(self) -> None:
        for f in self.rh.values():
            f.close()
        for fd in self.wh.values():
            os.close(fd)


def _merge_one(io: _TensorIO, method: str, t: UnitTensor) -> None:
    """Merge one output tensor: whole, or in blocks of rows (element-wise methods on big
    tensors; TIES in 16-bit dtypes in two streamed passes)."""
    import torch

    from rdistill.merge.methods import merge_tensor
    from rdistill.merge.st_io import ST_DTYPES
    from rdistill.merge.ties_stream import ties_blocks
    kinds = {loc.dtype for loc in t.locs}
    compute = io.dtype if kinds <= set(_FLOAT_RANK) else None
    if compute is None and len(kinds) == 1:
        compute = {"BF16": "bfloat16", "F16": "float16"}.get(kinds.pop())
    streamed_ties = method == "ties" and compute in ("bfloat16", "float16") and not t.shared["rescale"]
    pieces = list(_row_blocks(t.out, t.locs, t.rows, split=streamed_ties or (
        method in ELEMENTWISE and t.out.nbytes > BLOCK_BYTES)))
    if streamed_ties:
        numel = t.out.nbytes // torch.empty(0, dtype=ST_DTYPES[t.out.dtype]).element_size()
        for out, y in ties_blocks(lambda: ((o, io.load(ls, r)) for o, ls, r in pieces), numel, t.shared, t.per):
            io.write(out, y)
        return
    for out, ls, r in pieces:
        gens = []
        for i in range(max(1, len(t.per))):  # a generator per model, seeded per tensor
            g = torch.Generator(device=io.dev)
            g.manual_seed(t.seed + i)
            gens.append(g)
        io.write(out, merge_tensor(method, io.load(ls, r), t.shared, t.per, gens, out.name))


def merge_unit(method: str, dtype: Optional[str], out_dir: str, unit: Unit, use_gpu: bool) -> dict:
    """One task: merge and write the unit's tensors. Returns counts and the tensors that came
    out non-finite."""
    import resource
    t0 = time.time()
    io = _TensorIO(out_dir, dtype, use_gpu)
    try:
        for t in unit.tensors:
            _merge_one(io, method, t)
    finally:
        io.close()
    return {"tensors": len(unit.tensors), "bytes": sum(t.out.nbytes for t in unit.tensors), "nonfinite": io.bad,
            "seconds": time.time() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "pid": os.getpid()}


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


def _num_layers(models: list[InputModel]) -> int:
    cfg = models[0].config
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    return int(n) if n else 0


def _finish_dir(tmp: Path, donor: InputModel, step: MergeStep, placed: list[OutTensor], vocab: Optional[int]) -> None:
    config = dict(donor.config)
    dtypes = {t.dtype for t in placed if t.dtype in _FLOAT_RANK}
    if len(dtypes) == 1:
        name = {v: k for k, v in _NAME.items()}.get(dtypes.pop(), "float32")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if vocab is not None:
        config["vocab_size"] = vocab
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for f in COPIED:
        src = Path(donor.path) / f
        if src.exists():
            shutil.copy(src, tmp / f)
    write_index(tmp, placed)


def check_loads(out_dir: Path, placed: list[OutTensor]) -> None:
    """The written tensors are exactly what transformers' model class for this config expects."""
    import torch
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(out_dir)
    auto = transformers.AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in
                                                  (cfg.architectures or [])) else transformers.AutoModel
    with torch.device("meta"):
        model = auto.from_config(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {t.name: tuple(t.shape) for t in placed}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if cfg.get_text_config().tie_word_embeddings else set()
    missing = sorted(k for k in set(want) - set(have) if k not in tied and not k.endswith("lm_head.weight"))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or wrong:
        raise MergeError(f"{out_dir} does not load in transformers: missing {missing[:3]}, "
                         f"wrong shapes {wrong[:3]}")


def run_step(step: MergeStep, out_dir: str | Path, resolve: Callable[[str], str] = lambda r: r,
             opts: Optional[Options] = None, log: Callable[[str], None] = print) -> dict:
    """Merge one step into out_dir (replaced when complete). Returns counts and timings."""
    import ray

    from rdistill.topology import merge_task_options
    opts = opts or Options()
    t0 = time.time()
    out_dir = Path(out_dir).absolute()
    refs = step.inputs
    models = [load_input(r, resolve(r)) for r in refs]
    shapes, vocab = check_inputs(models, opts.unsafe_truncate_embeddings)
    donor = models[0]  # base first, else the first listed model (mergekit's donor)
    order = sorted(donor.tensors, key=lambda n: (donor.tensors[n].file, donor.tensors[n].start))
    specs = [(n, shapes[n], _out_dtype(step, [m.tensors[n] for m in models])) for n in order]
    placed, headers = layout_shards(specs, opts.shard_size)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        create_shards(tmp, headers)
        layers = _num_layers(models)
        items = []
        for out in placed:
            locs = [m.tensors[out.name] for m in models]
            rows = shapes[out.name][0] if any(loc.shape != shapes[out.name] for loc in locs) else None
            shared, per = tensor_parameters(step, out.name, layers)
            items.append(UnitTensor(out, locs, rows, shared, per, _tensor_seed(opts.seed, out.name)))
        total_in = sum(loc.nbytes for it in items for loc in it.locs)
        cpus = (os.cpu_count() or 1) if opts.in_process else int(ray.cluster_resources().get("CPU", 1))
        width = opts.num_tasks or cpus
        target = opts.unit_bytes or min(256 << 20, max(4 << 20, total_in // (4 * width)))
        units = _units(items, target)
        use_gpu = opts.device == "gpu"
        args = (step.merge_method, step.dtype, str(tmp))
        if opts.in_process:
            results = _merge_in_threads(units, args, use_gpu, width)
        else:  # at most `width` tasks in flight: each holds its tensors in memory
            task = ray.remote(merge_unit).options(**merge_task_options(opts.device))
            results = run_at_most(width, [lambda u=u: ray.get(task.remote(*args, u, use_gpu)) for u in units],
                                  name="merge")
        bad = [n for r in results for n in r["nonfinite"]]
        if bad:
            raise MergeError(f"{step.name}: {len(bad)} merged tensor(s) are not finite, e.g. {bad[:3]}; "
                             "check the inputs and parameters (a weight sum near 0 with normalize?)")
        _finish_dir(tmp, donor, step, placed, vocab)
        (tmp / "rdistill_merge.json").write_text(json.dumps(
            {"merge_method": step.merge_method, "base_model": step.base_model, "dtype": step.dtype,
             "out_dtype": step.out_dtype, "parameters": step.parameters, "seed": opts.seed,
             "models": [{"model": m.model, "parameters": m.parameters} for m in step.models],
             "resolved": {r: m.path for r, m in zip(refs, models)}}, indent=2, default=str))
        if opts.check_load:
            check_loads(tmp, placed)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wall = time.time() - t0
    out = {"tensors": len(placed), "bytes_written": sum(t.nbytes for t in placed), "bytes_read": total_in,
           "shards": len(headers), "tasks": len(units), "seconds": round(wall, 3),
           "max_task_peak_rss_mb": round(max(r["peak_rss_mb"] for r in results), 1),
           "workers": len({r["pid"] for r in results}),
           # each worker's peak (torch's own footprint included); their sum bounds the merge's memory
           "sum_worker_peak_rss_mb": round(sum({r["pid"]: r["peak_rss_mb"] for r in results}.values()), 1)}
    log(f"merge {step.name} ({step.merge_method}): {out['tensors']} tensors, "
        f"{out['bytes_written'] / 1e6:.1f} MB in {wall:.1f}s over {out['tasks']} task(s)")
    return out


__all__ = ["InputError", "MergeError", "Options", "run_step", "check_loads"]
