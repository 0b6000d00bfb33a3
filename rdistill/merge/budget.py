"""The merge's memory budget: what one work item holds at its peak, and the plan that keeps every
item in flight, together, under the budget.

One place estimates a work item's bytes (`item_bytes`): its input tensors or blocks from every
model as read, their copies in the compute dtype when that differs, the output, and the working
buffers of its method (float32 accumulators, TIES's task vectors, masks and signs, Fusion's
softmaxes, the SVDs' copies), conservatively (measured on one thread for each method, then
rounded up). A unit of several tensors merges them one after another, so it holds its largest.
The planner cuts a tensor too big for the budget into row blocks that fit (for the methods that
can merge blocks: element-wise ones, TIES and Fusion through two passes), refuses before any
work a budget too small for one row (`BudgetError`, naming the smallest budget that works), and
units start only when their bytes fit beside those already in flight, on threads or Ray tasks
alike (`rdistill.parallel.run_at_most` with their costs and the budget). The budget bounds the merge's working memory; the process's own footprint
(interpreter, torch: about 150 MB anonymous) comes on top.
"""

from __future__ import annotations

from typing import Optional

from rdistill.merge.plan import PlanError

DEFAULT_SHARE = 0.5
"""Default budget: this share of the node's available memory (MemAvailable)."""
_ELEM = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_TORCH = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class BudgetError(PlanError):
    """The memory budget cannot hold even the smallest piece of work; names the smallest that can."""


def parse_size(text: str) -> int:
    """A size in bytes: 2G, 500M, 1.5GB, 64KiB or a plain number (K/M/G/T are powers of 1024)."""
    t = str(text).strip().upper().replace("IB", "").rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise PlanError(f"memory size {text!r} is invalid: use e.g. 2G, 500M or a number of bytes") from None
    if value <= 0:
        raise PlanError(f"memory size {text!r} must be positive")
    return int(value * mult)


def available_bytes() -> int:
    """The node's MemAvailable (what can be allocated without swapping or dropping much cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_budget(max_bytes: Optional[int]) -> int:
    """The budget in bytes: the one given, else DEFAULT_SHARE of the available memory."""
    return int(max_bytes) if max_bytes else int(DEFAULT_SHARE * available_bytes())


def fmt(n: float) -> str:
    """Bytes as the CLI takes them back (--max-memory 1.3G, 40M)."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}"


def _work(method: str, n: int, e: int, c: int, chunk: int) -> int:
    """The method's working buffers beyond inputs, their compute-dtype copies and the output,
    for `e` elements per input, `n` inputs, compute element size `c` (chunk: TIES's two-pass
    work size, two_pass.CHUNK elements)."""
    if method == "ties_two_pass":  # per chunk: task vectors, masks, signs, sums; histograms
        k = min(e, chunk)
        return (n - 1) * k * (3 * c + 2) + k * (4 * c + 24) + 3 * (1 << 15) * 8
    if method in ("ties", "task_arithmetic", "dare_ties", "dare_linear"):  # whole tensor
        return (n - 1) * e * (3 * c + 2) + e * (4 * c + 24)
    if method == "linear":
        return e * (8 + c)
    if method == "slerp":
        return e * 4 + 16 * min(e, 1 << 20) * 4
    if method == "model_stock":
        return (n - 1) * e * c + 4 * e * c
    if method == "arcee_fusion":
        return 6 * e * max(c, 2) + e * 4
    if method in ("tsv_m", "iso_c", "iso_cts"):
        return 8 * e * 4
    return (n + 4) * e * 4  # regmean, regmean_plusplus: float32 copies; their Grams come on top


def item_bytes(method: str, step_dtype: Optional[str], t) -> int:
    """Peak bytes of one work item (a tensor or a block of rows, `work.UnitTensor`)."""
    from rdistill.merge import two_pass
    from rdistill.merge.work import compute_dtype
    e = 1
    for s in t.out.shape:
        e *= s
    n = len(t.locs)
    read = sum(loc.nbytes for loc in t.locs)
    if not all(loc.dtype in _ELEM for loc in t.locs):  # buffers: copied
        return read + t.out.nbytes
    cd = compute_dtype(step_dtype, t.locs)
    target = cd or _TORCH[max((loc.dtype for loc in t.locs), key=lambda d: _ELEM[d])]  # else promoted
    c = _ELEM[target]
    cast = sum(e * c for loc in t.locs if _TORCH[loc.dtype] != target)  # load()'s copies
    kind = method
    if method == "ties" and two_pass.handles(method, cd, t.shared):
        kind = "ties_two_pass"
    return read + cast + e * _ELEM.get(t.out.dtype, 4) + e * c + _work(kind, n, e, c, two_pass.CHUNK)


def rows_that_fit(method: str, step_dtype: Optional[str], t, budget: int) -> int:
    """The most rows of `t` per block whose item fits `budget` (0: not even one row)."""
    from rdistill.merge.work import row_block
    lo, hi = 0, t.out.shape[0]
    while lo < hi:  # item_bytes grows with the rows: bisect
        mid = (lo + hi + 1) // 2
        if item_bytes(method, step_dtype, row_block(t, 0, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def too_small(budget: int, need: int, what: str) -> BudgetError:
    least = int(need * 1.01) + 1
    return BudgetError(f"memory budget {fmt(budget)} (--max-memory, merge.max_memory_gb) cannot hold {what}: "
                       f"the smallest budget that works is {fmt(least)} ({least} bytes)")
