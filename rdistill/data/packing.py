"""Neat packing: several samples per row of at most max_len tokens, each keeping its own
position ids (0, 1, 2, ... restarting per sample) so that attention never crosses samples.

transformers 5.x (masking_utils.find_packed_sequence_indices) reads a reset of position_ids
as a sample boundary and builds a block-diagonal causal mask for sdpa/eager, and
flash-attention-2 uses the same resets as cu_seqlens, when the model is called with
position_ids, no attention_mask and no cache. Padding at the end of a row restarts positions
too, so it forms its own segment that no real token attends to.

Rows are stored flat (numpy) in one .npz file that every training worker reads.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from rdistill.data.sft import IGNORE, Tokenized


def pack_first_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Bins of sample indices whose lengths sum to at most max_len (first-fit decreasing)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_len - lengths[i])
    return [sorted(b) for b in bins]


def build_rows(samples: list[Tokenized], max_len: int, packing: bool) -> list[list[int]]:
    """Sample indices of each training row: packed bins, or one sample per row."""
    if not packing:
        return [[i] for i in range(len(samples))]
    return pack_first_fit([len(s.input_ids) for s in samples], max_len)


def padding_share(row_lengths: list[int], micro_batch: int) -> float:
    """Share of pad tokens when consecutive rows form micro-batches padded to their longest row."""
    pad = total = 0
    for i in range(0, len(row_lengths), micro_batch):
        chunk = row_lengths[i:i + micro_batch]
        total += max(chunk) * len(chunk)
        pad += max(chunk) * len(chunk) - sum(chunk)
    return pad / total if total else 0.0


def save_rows(path: str | Path, samples: list[Tokenized], rows: list[list[int]]) -> dict:
    """Write the rows flat: ids, shifted targets, positions and row offsets. Returns counts."""
    ids, tgt, pos, offsets = [], [], [], [0]
    for row in rows:
        for i in row:
            s = samples[i]
            ids += s.input_ids
            tgt += s.targets
            pos += range(len(s.input_ids))
        offsets.append(len(ids))
    np.savez(path, ids=np.asarray(ids, np.int32), targets=np.asarray(tgt, np.int32),
             positions=np.asarray(pos, np.int32), offsets=np.asarray(offsets, np.int64))
    return {"rows": len(rows), "tokens": len(ids)}


class PackedRows:
    """The rows written by save_rows, and the padded micro-batches a worker trains on."""

    def __init__(self, path: str | Path):
        z = np.load(path)
        self.ids, self.targets, self.positions = z["ids"], z["targets"], z["positions"]
        self.offsets = z["offsets"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row_length(self, r: int) -> int:
        return int(self.offsets[r + 1] - self.offsets[r])

    def batch(self, rows: list[int], pad_id: int) -> dict:
        """input_ids, position_ids, targets (B, T) padded to the longest row; pad tokens get
        IGNORE targets and positions restarting at 0 (a segment of their own)."""
        import torch
        T = max(self.row_length(r) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            a, e = int(self.offsets[r]), int(self.offsets[r + 1])
            n = e - a
            ids[b, :n] = torch.from_numpy(self.ids[a:e].astype(np.int64))
            tgt[b, :n] = torch.from_numpy(self.targets[a:e].astype(np.int64))
            pos[b, :n] = torch.from_numpy(self.positions[a:e].astype(np.int64))
            pos[b, n:] = torch.arange(T - n)
        return {"input_ids": ids, "position_ids": pos, "targets": tgt,
                "tokens": sum(self.row_length(r) for r in rows), "padded": len(rows) * T}


def step_rows(n_rows: int, step: int, per_step: int, seed: int) -> list[int]:
    """Row indices of one optimizer step: the data is an endless stream of seeded per-epoch
    permutations, so a resumed run picks up exactly where a step number says it was."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(i, n_rows)
        out.append(int(_permutation(n_rows, seed, epoch)[k]))
    return out


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
