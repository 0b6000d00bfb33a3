"""What one merge task does: read its tensors from the inputs' shards, merge them, write them at
their offsets in the output's shards. Runs as a Ray task or in a thread of the driver, the same code.

A work item (`UnitTensor`) is a whole tensor, or a block of rows of a big one: element-wise
methods merge a block on its own; TIES and Arcee Fusion need a statistic of the whole tensor, so
their blocks run twice (`phase` "stats", then "apply" with the reduced statistic, see two_pass).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from rdistill.merge.st_io import OutTensor, TensorLoc

FLOAT_RANK = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}


@dataclass
class UnitTensor:
    """One output tensor's work, or one block of rows of it."""
    out: OutTensor
    locs: list
    """The inputs' TensorLocs, in the method's order (base first)."""
    rows: Optional[int]
    """Rows to keep of embeddings of different vocab sizes (None: all)."""
    shared: dict
    per: list
    """One parameter dict per non-base model."""
    seed: int
    phase: str = "merge"
    """merge (the tensor, or a block of an element-wise method) | stats | apply (two_pass)."""
    block: int = 0
    """Index of this block of rows within its tensor (0: the whole tensor)."""
    offset: int = 0
    """Index of this block's first element in the flattened tensor."""
    numel: int = 0
    """Elements of the whole tensor (two-pass blocks)."""
    ctx: Any = None
    """apply: this block's share of the reduced statistic."""


@dataclass
class Unit:
    tensors: list = field(default_factory=list)
    """UnitTensors merged by one task."""


def compute_dtype(step_dtype: Optional[str], locs: list[TensorLoc]) -> Optional[str]:
    """The dtype a float tensor is merged in: the step's, else the inputs' when they agree on a
    16-bit one (None: the promoted dtype, decided when loaded)."""
    kinds = {loc.dtype for loc in locs}
    if not kinds <= set(FLOAT_RANK):
        return None
    if step_dtype:
        return step_dtype
    return {"BF16": "bfloat16", "F16": "float16"}.get(kinds.pop()) if len(kinds) == 1 else None


def row_block(t: UnitTensor, r0: int, r1: int, b: int = 0) -> UnitTensor:
    """Rows r0..r1 of `t` as block `b`: it reads and writes only those rows."""
    out, n = t.out, t.out.shape[0]
    o_row = out.nbytes // n
    cols = 1
    for s in out.shape[1:]:
        cols *= s
    shape = (r1 - r0, *out.shape[1:])
    locs = [replace(loc, shape=shape, start=loc.start + r0 * (loc.nbytes // loc.shape[0]),
                    nbytes=(r1 - r0) * (loc.nbytes // loc.shape[0])) for loc in t.locs]
    return replace(t, out=replace(out, shape=shape, start=out.start + r0 * o_row, nbytes=(r1 - r0) * o_row),
                   locs=locs, rows=None, block=b, offset=r0 * cols, numel=n * cols)


def row_blocks(t: UnitTensor, blocks: int) -> list[UnitTensor]:
    """`t` cut into `blocks` blocks of rows (about equal)."""
    n = t.out.shape[0]
    step = -(-n // blocks)
    return [row_block(t, r0, min(n, r0 + step), b) for b, r0 in enumerate(range(0, n, step))]


class TensorIO:
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
        # min and max carry any NaN or inf: one pass, no mask of the tensor's size
        if y.is_floating_point() and y.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(y))).all()):
            self.bad.append(out.name)
        write_tensor(self.out_dir, out, y, self.wh)

    def close(self) -> None:
        for f in self.rh.values():
            f.close()
        for fd in self.wh.values():
            os.close(fd)


def _merge_one(io: TensorIO, method: str, t: UnitTensor) -> Any:
    """Merge (or for a two-pass block's first pass, measure) one work item."""
    import torch

    from rdistill.merge import two_pass
    from rdistill.merge.methods import merge_tensor
    from rdistill.merge.st_io import ST_DTYPES
    xs = io.load(t.locs, t.rows)
    if t.phase == "stats":
        return two_pass.stats(method, xs, t.per, t.offset, t.numel, t.seed)
    if t.phase == "apply":
        y = two_pass.apply(method, xs, t.shared, t.per, t.ctx, ST_DTYPES[t.out.dtype])
    elif two_pass.handles(method, compute_dtype(io.dtype, t.locs), t.shared):
        # TIES without a sort; Fusion written in 16 bits without a float32 copy (the same bits)
        y = two_pass.merge_whole(method, xs, t.shared, t.per, t.seed, ST_DTYPES[t.out.dtype])
    else:
        gens = []
        for i in range(max(1, len(t.per))):  # a generator per model, seeded per tensor
            g = torch.Generator(device=io.dev)
            g.manual_seed(t.seed + i)
            gens.append(g)
        y = merge_tensor(method, xs, t.shared, t.per, gens, t.out.name)
    io.write(t.out, y)
    return None


_LIBC: Any = False  # glibc once loaded (None: not glibc)


def _libc() -> Any:
    global _LIBC
    if _LIBC is False:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC


def release_freed_buffers() -> None:
    """Hand memory torch freed back to the kernel. glibc's mmap threshold is fixed at 4 MiB
    (by default it grows to 32 MiB), so tensors and blocks are unmapped when freed; the smaller
    buffers left free in the per-thread arenas are returned by malloc_trim after each unit.
    Without both a merge of mid-sized tensors kept about twice its live memory resident, and
    memory did not follow the budget. A no-op where there is no glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def merge_unit(method: str, dtype: Optional[str], out_dir: str, unit: Unit, use_gpu: bool) -> dict:
    """One task: merge and write the unit's tensors. Returns counts, the tensors that came out
    non-finite, and the first-pass statistics of two-pass blocks by (tensor, block)."""
    _libc()
    t0 = time.time()
    io = TensorIO(out_dir, dtype, use_gpu)
    stats = {}
    try:
        for t in unit.tensors:
            s = _merge_one(io, method, t)
            if t.phase == "stats":
                stats[(t.out.name, t.block)] = s
    finally:
        io.close()
        release_freed_buffers()
    return {"tensors": len(unit.tensors), "bytes": sum(t.out.nbytes for t in unit.tensors), "nonfinite": io.bad,
            "seconds": time.time() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "pid": os.getpid(), "stats": stats}
