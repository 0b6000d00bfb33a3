"""Neat packing: several samples per row of at most max_len tokens, each keeping its own
position ids (0, 1, 2, ... restarting per sample) so that attention never crosses samples.

transformers 5.x (masking_utils.find_packed_sequence_indices) reads a reset of position_ids
as a sample boundary and builds a block-diagonal causal mask for sdpa/eager, and
flash-attention-2 uses the same resets as cu_seqlens (varlen), when the model is called with
position_ids, no attention_mask and no cache. Padding at the end of a row restarts positions
too, so it forms its own segment that no real token attends to.

Rows are stored flat in a directory of .npy files (ids, targets, positions: int32 per token;
offsets: int64 per row boundary; optionally float32 per-token columns for losses other than
SFT's: `advantages` and `old_logprobs` of on-policy distillation's policy-gradient loss). Workers open them memory-mapped and read only the rows they
train on, so no process ever holds the whole set (a 32k-token R1 set of a million samples is
tens of GB).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from rdistill.data.sft import IGNORE, Tokenized

COLUMNS = ("ids", "targets", "positions")
FLOAT_COLUMNS = ("advantages", "old_logprobs")
"""Optional per-token float32 columns, aligned with `targets` (the value at a position belongs to
the token that position predicts; 0 where the target is IGNORE)."""
KD_COLUMNS = ("kd_ids", "kd_logprobs")
"""Optional (tokens, k) columns of offline logit KD: the teacher's top-k token ids (int32) and
logprobs (float16) for the token each position predicts (rdistill.train.kd)."""
KD_PAD_LOGPROB = -1.0e4  # a missing top-k entry: probability 0 after renormalisation


def kd_bytes_per_token(top_k: int) -> int:
    """Bytes the KD columns take per token: int32 ids + float16 logprobs."""
    return 6 * top_k


def pack_first_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Bins of sample indices whose lengths sum to at most max_len (first-fit decreasing).

    Each sample goes to the first open bin (in opening order) with room for it; a max-tree over
    the bins' room finds that bin in O(log bins), so millions of samples pack in seconds."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    tree = [0] * (2 * size)  # tree[size + b] = room left in bin b; inner nodes: max of children
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if tree[1] >= n:
            k = 1
            while k < size:  # leftmost leaf with room >= n
                k = 2 * k if tree[2 * k] >= n else 2 * k + 1
            b = k - size
            bins[b].append(i)
            room = tree[k] - n
        else:
            b, room = len(bins), max_len - n
            bins.append([i])
            k = size + b
        tree[k] = room
        k //= 2
        while k:
            tree[k] = max(tree[2 * k], tree[2 * k + 1])
            k //= 2
    return [sorted(b) for b in bins]


def build_rows(samples: list[Tokenized] | list[int], max_len: int, packing: bool) -> list[list[int]]:
    """Sample indices of each training row: packed bins, or one sample per row (samples or
    their lengths)."""
    if not packing:
        return [[i] for i in range(len(samples))]
    return pack_first_fit([s if isinstance(s, int) else len(s.input_ids) for s in samples], max_len)


def padding_share(row_lengths: list[int], micro_batch: int) -> float:
    """Share of pad tokens when consecutive rows form micro-batches padded to their longest row."""
    pad = total = 0
    for i in range(0, len(row_lengths), micro_batch):
        chunk = row_lengths[i:i + micro_batch]
        total += max(chunk) * len(chunk)
        pad += max(chunk) * len(chunk) - sum(chunk)
    return pad / total if total else 0.0


def row_layout(lengths: list[int] | np.ndarray, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets (len(rows) + 1) and each sample's start in the flat arrays (-1: in no row)."""
    offsets = np.zeros(len(rows) + 1, np.int64)
    dest = np.full(len(lengths), -1, np.int64)
    at = 0
    for r, row in enumerate(rows):
        for i in row:
            dest[i] = at
            at += int(lengths[i])
        offsets[r + 1] = at
    return offsets, dest


def open_rows(path: str | Path, offsets: np.ndarray) -> dict:
    """Create the rows directory for these offsets; returns its writable token arrays (each
    writer fills its samples' slices: several processes may write one file at once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "offsets.npy", offsets)
    total = int(offsets[-1])
    return {c: np.lib.format.open_memmap(path / f"{c}.npy", mode="w+", dtype=np.int32, shape=(total,))
            for c in COLUMNS}


def reopen_rows(path: str | Path) -> dict:
    """The token arrays of a directory made by open_rows, writable (for other processes)."""
    return {c: np.load(Path(path) / f"{c}.npy", mmap_mode="r+") for c in COLUMNS}


def write_sample(arrays: dict, at: int, input_ids, targets) -> None:
    n = len(input_ids)
    arrays["ids"][at:at + n] = input_ids
    arrays["targets"][at:at + n] = targets
    arrays["positions"][at:at + n] = np.arange(n, dtype=np.int32)


def save_rows(path: str | Path, samples: list[Tokenized], rows: list[list[int]]) -> dict:
    """Write the rows flat: ids, shifted targets, positions and row offsets. Returns counts."""
    offsets, dest = row_layout([len(s.input_ids) for s in samples], rows)
    arrays = open_rows(path, offsets)
    for i, s in enumerate(samples):
        if dest[i] >= 0:
            write_sample(arrays, int(dest[i]), s.input_ids, s.targets)
    for a in arrays.values():
        a.flush()
    return {"rows": len(rows), "tokens": int(offsets[-1])}


def save_token_rows(path: str | Path, samples: list[dict], rows: list[list[int]]) -> dict:
    """save_rows for samples given as token arrays: {ids, targets} and any FLOAT_COLUMNS or
    KD_COLUMNS (all of one length per sample, targets already shifted); the columns present in
    the first sample are written for every sample."""
    offsets, dest = row_layout([len(s["ids"]) for s in samples], rows)
    arrays = open_rows(path, offsets)
    extra = [c for c in FLOAT_COLUMNS if samples and c in samples[0]]
    floats = {c: np.lib.format.open_memmap(Path(path) / f"{c}.npy", mode="w+", dtype=np.float32,
                                           shape=(int(offsets[-1]),)) for c in extra}
    if samples and "kd_ids" in samples[0]:  # (tokens, k) teacher top-k, padded where a row has none
        k = max(s["kd_ids"].shape[1] for s in samples)
        for c, dt, fill in (("kd_ids", np.int32, 0), ("kd_logprobs", np.float16, KD_PAD_LOGPROB)):
            floats[c] = np.lib.format.open_memmap(Path(path) / f"{c}.npy", mode="w+", dtype=dt,
                                                  shape=(int(offsets[-1]), k))
            floats[c][:] = fill
        extra += list(KD_COLUMNS)
    for i, s in enumerate(samples):
        at = int(dest[i])
        if at < 0:
            continue
        write_sample(arrays, at, s["ids"], s["targets"])
        for c in extra:
            v = s[c]  # a narrower top-k keeps the fill in its last columns
            if v.ndim == 2:
                floats[c][at:at + len(v), :v.shape[1]] = v
            else:
                floats[c][at:at + len(v)] = v
    for a in (*arrays.values(), *floats.values()):
        a.flush()
    return {"rows": len(rows), "tokens": int(offsets[-1])}


class PackedRows:
    """The rows written by save_rows (memory-mapped: only the rows asked for are read), and the
    padded micro-batches a worker trains on."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_file():  # a single .npz of an older run: read whole
            z = np.load(path)
            cols = {"ids": z["ids"], "targets": z["targets"], "positions": z["positions"], "offsets": z["offsets"]}
        else:
            cols = {c: np.load(path / f"{c}.npy", mmap_mode="r") for c in (*COLUMNS, "offsets")}
        self.ids, self.targets, self.positions = cols["ids"], cols["targets"], cols["positions"]
        self.offsets = np.asarray(cols["offsets"])  # 8 bytes per row: small enough to hold
        self.floats = {c: np.load(path / f"{c}.npy", mmap_mode="r") for c in FLOAT_COLUMNS
                       if path.is_dir() and (path / f"{c}.npy").exists()}
        self.kd = {c: np.load(path / f"{c}.npy", mmap_mode="r") for c in KD_COLUMNS
                   if path.is_dir() and (path / f"{c}.npy").exists()}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row_length(self, r: int) -> int:
        return int(self.offsets[r + 1] - self.offsets[r])

    def batch(self, rows: list[int], pad_id: int, flat: bool = False, multiple: int = 1) -> dict:
        """input_ids, position_ids, targets (B, T) padded to the longest row; pad tokens get
        IGNORE targets and positions restarting at 0 (a segment of their own).

        flat: the rows one after another as a single (1, T) row (flash-attention-2's varlen path
        and sequence parallelism take one row); T is padded up to a multiple of `multiple`."""
        import torch
        lens = [self.row_length(r) for r in rows]
        groups = [list(range(len(rows)))] if flat else [[b] for b in range(len(rows))]
        T = max(sum(lens[b] for b in g) for g in groups)
        T = -(-T // multiple) * multiple
        ids = torch.full((len(groups), T), pad_id, dtype=torch.long)
        tgt = torch.full((len(groups), T), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(groups), T), dtype=torch.long)
        floats = {c: torch.zeros((len(groups), T), dtype=torch.float32) for c in self.floats}
        if self.kd:
            k = self.kd["kd_ids"].shape[1]
            floats["kd_ids"] = torch.zeros((len(groups), T, k), dtype=torch.long)
            floats["kd_logprobs"] = torch.full((len(groups), T, k), KD_PAD_LOGPROB, dtype=torch.float32)
        for g, members in enumerate(groups):
            at = 0
            for b in members:
                a, e = int(self.offsets[rows[b]]), int(self.offsets[rows[b] + 1])
                for dst, src in ((ids, self.ids), (tgt, self.targets), (pos, self.positions)):
                    dst[g, at:at + e - a] = torch.from_numpy(np.asarray(src[a:e], dtype=np.int64))
                for c, dst in floats.items():
                    src = self.kd[c] if c in KD_COLUMNS else self.floats[c]
                    dst[g, at:at + e - a] = torch.from_numpy(np.array(src[a:e], dtype=dst.numpy().dtype))
                at += e - a
            pos[g, at:] = torch.arange(T - at)
        return {"input_ids": ids, "position_ids": pos, "targets": tgt, **floats,
                "tokens": sum(lens), "padded": len(groups) * T}


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
