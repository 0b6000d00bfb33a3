"""TIES over a big tensor in blocks of rows, in two passes, with the same result as whole-tensor TIES.

Pass 1 finds each model's top-`density` magnitude threshold from a histogram of the 16-bit
patterns of |task vector| (for bf16 and fp16, non-negative values sort as their bit patterns),
which is exact, O(n) and needs no sort. Pass 2 rebuilds each block's task vectors, keeps the
entries above the threshold plus, of those equal to it, the first ones in index order until
exactly k are kept (as `methods.top_k_mask` does), and combines them block by block. A worker then
holds a few blocks instead of several copies of an embedding matrix.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from rdistill.merge.methods import combine

Blocks = Callable[[], Iterator[tuple[int, list[torch.Tensor]]]]
"""Yields (first row, [base block, model blocks...]) over the tensor, in row order."""


def _bits(d: torch.Tensor) -> torch.Tensor:
    return d.abs().view(torch.int16)


def thresholds(blocks: Blocks, numel: int, densities: list[float]) -> list[tuple[int, int] | None]:
    """Per model: (threshold bit pattern, how many entries equal to it to keep), or None to keep all."""
    hists = [torch.zeros(1 << 15, dtype=torch.int64) for _ in densities]
    for _, xs in blocks():
        for i, x in enumerate(xs[1:]):
            if densities[i] < 1:
                hists[i] += torch.bincount(_bits(x - xs[0]).reshape(-1), minlength=1 << 15)[: 1 << 15]
    out = []
    for hist, density in zip(hists, densities):
        if density >= 1:
            out.append(None)
            continue
        k = max(1, int(density * numel)) if density > 0 else 0
        ge = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # ge[b] = count(bits >= b)
        thr = int((ge >= k).nonzero().max()) if k else (1 << 15) - 1
        greater = int(ge[thr + 1]) if thr + 1 < len(ge) else 0
        out.append((thr, k - greater if k else 0))
    return out


def ties_blocks(blocks: Blocks, numel: int, shared: dict, per: list[dict]) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (first row, merged block) for TIES with 16-bit compute and rescale off."""
    cuts = thresholds(blocks, numel, [p["density"] for p in per])
    seen = [0] * len(per)
    for r0, xs in blocks():
        base = xs[0]
        deltas = base.new_empty((len(per), *base.shape))
        for i, x in enumerate(xs[1:]):
            delta = x - base
            if per[i]["density"] <= 0:
                delta = torch.zeros_like(delta)
            elif cuts[i] is not None:
                thr, need = cuts[i]
                bits = _bits(delta)
                keep = bits > thr
                eq = bits == thr
                n_eq = int(eq.sum())
                if seen[i] + n_eq <= need:  # every tie in this block is still wanted
                    keep |= eq
                elif seen[i] < need:  # the block where the wanted ties run out: first ones by index
                    keep |= eq & ((torch.cumsum(eq.reshape(-1), 0).reshape(eq.shape) + seen[i]) <= need)
                seen[i] += n_eq
                delta = delta * keep.to(delta.dtype)
            deltas[i] = delta
        yield r0, combine(base, deltas, shared, per, consensus=True)
