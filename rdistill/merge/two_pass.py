"""Methods that need one statistic of a whole tensor, merged in blocks of rows by different tasks.

TIES keeps each task vector's top-`density` magnitudes (a threshold over the whole tensor) and
Arcee Fusion keeps the changes whose importance reaches median + 1.5 IQR (quantiles over the
whole tensor). A big tensor (an embedding matrix is most of a small model) is cut into blocks of
rows; pass 1 computes a small statistic per block (`stats`), the driver combines them (`reduce`)
into what each block needs, and pass 2 merges each block (`apply`). Every block of a tensor can
run on a different core or node, and the result equals whole-tensor merging bit for bit:

- TIES (16-bit compute, no rescale): a histogram of the 16-bit patterns of |task vector| per
  block, sent as its non-zero bins (bf16 and fp16 non-negative values sort as their bit
  patterns), so the threshold is exact and O(n); of the entries equal to it, the first ones in
  index order are kept until exactly k are (as `methods.top_k_mask` does), which needs how many
  ties lie in the blocks before.
- Arcee Fusion: importance is row-local (a per-row KL times |change|), so a block computes its
  rows' importances and returns those at the positions of the quantile sample (drawn from the
  same seeded generator as the whole-tensor path) and its rows' KL (pass 2 then skips the
  softmaxes); the driver takes the quantiles of the sample.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from rdistill.merge.methods import (combine, fusion_importance, fusion_keep, fusion_kl, fusion_merge,
                                    fusion_threshold, sample_indices)

_BINS = 1 << 15
CHUNK = 1 << 18
"""TIES works through a block this many elements (whole rows) at a time: its masks, signs and
task vectors are then about 1-2 MB whatever the block's size, and the result is the same bits
(every step after the threshold is element-wise)."""


def _chunks(x: torch.Tensor) -> list[slice]:
    """Row ranges of about CHUNK elements (a 0-D or 1-D tensor: one)."""
    if x.dim() < 2:
        return [slice(0, None)]
    step = max(1, CHUNK // max(1, x[0].numel()))
    return [slice(r, r + step) for r in range(0, x.shape[0], step)]


def handles(method: str, compute: Optional[str], shared: dict) -> bool:
    """Whether `method` at this compute dtype is merged by this module's passes (None: not a
    float tensor, or floats of mixed dtypes: methods.merge_tensor copies or promotes them)."""
    if method == "ties":
        return compute in ("bfloat16", "float16") and not shared["rescale"]
    return method == "arcee_fusion" and compute is not None


def _bits(d: torch.Tensor) -> torch.Tensor:
    return d.abs().view(torch.int16)


def stats(method: str, xs: list[torch.Tensor], per: list[dict], offset: int, numel: int, seed: int) -> Any:
    """Pass 1 over one block (`offset`: its first element's index in the flattened tensor of
    `numel` elements). TIES: per model a histogram of |delta| bit patterns (None: kept whole).
    Fusion: (positions in the quantile sample, importances there, the rows' KL)."""
    if method == "ties":
        base = xs[0]
        out = []
        for x, p in zip(xs[1:], per):
            if not 0 < p["density"] < 1:
                out.append(None)
                continue
            hist = sum(torch.bincount(_bits(x[c] - base[c]).reshape(-1), minlength=_BINS)[:_BINS] for c in _chunks(base))
            bins = hist.nonzero().reshape(-1)  # sparse: the driver holds every block's until it reduces them
            out.append((bins.to(torch.int32), hist[bins].to(torch.int32)))
        return out
    kl = fusion_kl(xs[0], xs[1])  # the softmaxes: most of the work, so pass 2 reuses it
    flat = fusion_importance(xs[0], xs[1], kl).reshape(-1)
    idx = sample_indices(numel, seed)
    if idx is None:  # small tensor: the quantiles of every importance
        return torch.arange(offset, offset + flat.numel()), flat.cpu().clone(), kl.cpu()
    inside = ((idx >= offset) & (idx < offset + flat.numel())).nonzero().reshape(-1)
    return inside, flat[(idx[inside] - offset).to(flat.device)].cpu(), kl.cpu()


def reduce(method: str, parts: list, per: list[dict], numel: int) -> list:
    """What each block needs for pass 2, from every block's pass-1 statistic (in row order)."""
    if method == "ties":
        out: list[list] = [[] for _ in parts]
        for i, p in enumerate(per):
            if parts[0][i] is None:
                for o in out:
                    o.append(None)
                continue
            hist = torch.zeros(_BINS, dtype=torch.int64)
            for part in parts:
                hist.index_add_(0, part[i][0].long(), part[i][1].long())
            k = max(1, int(p["density"] * numel))
            ge = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # ge[b] = count(bits >= b)
            thr = int((ge >= k).nonzero().max())
            need = k - (int(ge[thr + 1]) if thr + 1 < _BINS else 0)  # ties at thr to keep
            seen = 0
            for o, part in zip(out, parts):
                bins, counts = part[i]
                n_eq = int(counts[bins == thr].sum())
                o.append((thr, need, seen, n_eq))
                seen += n_eq
        return out
    n = sum(int(pos.numel()) for pos, _, _ in parts)
    sample = torch.empty(n, dtype=parts[0][1].dtype)
    for pos, vals, _ in parts:
        sample[pos] = vals
    thr = fusion_threshold(sample)
    return [(thr, kl) for _, _, kl in parts]


def apply(method: str, xs: list[torch.Tensor], shared: dict, per: list[dict], ctx: Any,
          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pass 2: merge one block, given its share of the reduced statistic (`out_dtype`: the dtype
    it is written in)."""
    base = xs[0]
    if method != "ties":
        thr, kl = ctx
        return fusion_merge(base, xs[1], fusion_importance(base, xs[1], kl.to(base.device)) >= thr, out_dtype)
    out = torch.empty_like(base)
    seen = [c[2] if c is not None else 0 for c in ctx]  # ties at the threshold before this chunk
    for rows in _chunks(base):
        out[rows] = _apply_ties(base[rows], [x[rows] for x in xs[1:]], shared, per, ctx, seen)
    return out


def _apply_ties(base: torch.Tensor, others: list[torch.Tensor], shared: dict, per: list[dict], ctx: list,
                seen: list[int]) -> torch.Tensor:
    """One chunk of TIES's pass 2; `seen` (per model: ties at the threshold in earlier chunks,
    updated) decides which of the equal magnitudes are kept, in index order."""
    deltas = base.new_empty((len(per), *base.shape))
    for i, (x, p) in enumerate(zip(others, per)):
        delta = x - base
        if p["density"] <= 0:
            delta.zero_()
        elif ctx[i] is not None:
            thr, need, _, _ = ctx[i]
            bits = _bits(delta)
            keep = bits > thr
            if seen[i] < need:  # this chunk may hold some of the ties at the threshold that are kept
                eq = bits == thr
                n_eq = int(eq.sum())
                if seen[i] + n_eq > need:  # the wanted ties run out here: the first ones by index
                    eq &= (torch.cumsum(eq.reshape(-1), 0).reshape(eq.shape) + seen[i]) <= need
                keep |= eq
                seen[i] += n_eq
            delta = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype))
        deltas[i] = delta
    return combine(base, deltas, shared, per, consensus=True)


def merge_whole(method: str, xs: list[torch.Tensor], shared: dict, per: list[dict], seed: int,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Both passes over a tensor held whole (one block)."""
    if method == "arcee_fusion":
        return fusion_merge(xs[0], xs[1], fusion_keep(xs[0], xs[1], seed), out_dtype)
    numel = xs[0].numel()
    return apply(method, xs, shared, per, reduce(method, [stats(method, xs, per, 0, numel, seed)], per, numel)[0],
                 out_dtype)
