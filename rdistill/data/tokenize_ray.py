"""Tokenize and pack an SFT set as a Ray Data job, for sets of millions of samples.

The same rows as the driver path (rdistill.train.sft.prepare_data with tokenize_files), without
the set ever passing through one process:
1. The driver cuts each JSONL file into byte ranges that start at line starts (seeks only).
2. `map_batches` actors (one tokenizer each) read their ranges and tokenize every line with the
   driver path's functions (parse_sft_line, tokenize_record); the tokens stay in the object
   store, and the driver collects only each sample's status, length and loss-token count.
3. The driver packs on the lengths (first-fit decreasing is global, and cheap on integers) in
   file-and-line order, so the bins, and hence the rows, equal the driver path's.
4. `map_batches` writers copy each kept sample's tokens to its place in the memory-mapped .npy
   files (the rows directory must be on storage every node sees, as checkpoints are).

Used when train.tokenize_with_ray_data is true, or when it is unset (null) and the SFT files
hold at least RAY_DATA_MIN_BYTES together; below that, starting actors costs more than it saves.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rdistill.data.sft import KEPT, SFTDataError, TokenizeStats, check_stats, count_sample

RAY_DATA_MIN_BYTES = 256 << 20  # ~10k R1 traces of 16k tokens
CHUNK_BYTES = 8 << 20  # bytes of JSONL per tokenize task (a few hundred long traces)
LINE = "\x00"  # stands for the line number in messages built before it is known


def use_ray_data(setting: bool | None, paths: list[str]) -> bool:
    if setting is not None:
        return setting
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) >= RAY_DATA_MIN_BYTES


def file_chunks(paths: list[str], chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Byte ranges [start, end) of the files, each starting at a line start, in file order."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise SFTDataError(f"SFT file {path} does not exist: run the verify stage first or fix the path")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            start = 0
            while start < size:
                f.seek(min(size, start + chunk_bytes))
                f.readline()  # to the end of the line the cut fell in
                end = min(size, f.tell())
                out.append({"chunk": len(out), "path": str(path), "start": start, "end": end})
                start = end
    return out


class _Tokenize:
    """Tokenizes whole chunks: one output row per sample (kept or not) and one per bad line."""

    def __init__(self, model_dir: str, chat_template: str | None, max_len: int):
        from transformers import AutoTokenizer
        from rdistill.data.chat_template import apply_chat_template_override
        self.tok = apply_chat_template_override(AutoTokenizer.from_pretrained(model_dir), chat_template)
        self.max_len = max_len

    def __call__(self, batch: dict):
        import pyarrow as pa
        from rdistill.data.sft import parse_sft_line, tokenize_record
        cols: dict = {k: [] for k in ("chunk", "k", "line", "status", "length", "loss_tokens", "error",
                                      "input_ids", "targets")}
        for chunk, path, start, end in zip(batch["chunk"], batch["path"], batch["start"], batch["end"]):
            with open(path, "rb") as f:
                f.seek(int(start))
                lines = f.read(int(end) - int(start)).decode().split("\n")
            k = 0
            for n, line in enumerate(lines, 1):
                status, t, err = KEPT, None, ""
                try:
                    rec = parse_sft_line(line, f"{path}:{LINE}", f"{Path(path).name}:{LINE}")
                    if rec is None:
                        continue
                    status, t = tokenize_record(self.tok, rec, self.max_len)
                except SFTDataError as e:
                    status, err = -1, str(e)
                for key, v in (("chunk", int(chunk)), ("k", k), ("line", n), ("status", status),
                               ("length", len(t.input_ids) if t else 0),
                               ("loss_tokens", sum(t.loss_mask[1:]) if t else 0), ("error", err),
                               ("input_ids", t.input_ids if t and status == KEPT else []),
                               ("targets", t.targets if t and status == KEPT else [])):
                    cols[key].append(v)
                k += 1
                if err:
                    break  # as the driver path, which stops at the first bad line
        ints = pa.list_(pa.int32())
        return pa.table({k: pa.array(v, type=ints) if k in ("input_ids", "targets") else v
                         for k, v in cols.items()})


class _Write:
    """Copies kept samples to their places in the rows directory."""

    def __init__(self, rows_dir: str, base: np.ndarray, dest: np.ndarray):
        from rdistill.data.packing import reopen_rows
        self.arrays, self.base, self.dest = reopen_rows(rows_dir), base, dest

    def __call__(self, batch):
        from rdistill.data.packing import write_sample
        written = 0
        chunk, k = batch["chunk"].to_numpy(), batch["k"].to_numpy()
        ids, tgt = batch["input_ids"], batch["targets"]
        for j in range(len(chunk)):
            at = int(self.dest[self.base[chunk[j]] + k[j]])
            if at >= 0:
                write_sample(self.arrays, at, ids[j].values.to_numpy(), tgt[j].values.to_numpy())
                written += 1
        for a in self.arrays.values():
            a.flush()
        return {"written": np.array([written])}


def tokenize_and_pack(model_dir: str, chat_template: str | None, paths: list[str], max_len: int,
                      packing: bool, rows_dir: Path, chunk_bytes: int = CHUNK_BYTES
                      ) -> tuple[list[int], list[list[int]], TokenizeStats]:
    """Tokenize across the Ray cluster, pack, write the rows directory; returns the kept
    samples' lengths (file order), the rows and the stats, as the driver path would."""
    import ray
    from rdistill.data.packing import build_rows, open_rows, row_layout
    from rdistill.config import RayConfig
    from rdistill.topology import init_ray
    if not ray.is_initialized():
        init_ray(RayConfig())
    chunks = file_chunks(paths, chunk_bytes)
    st = TokenizeStats(files=[str(p) for p in paths])
    if not chunks:
        check_stats(st, max_len)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    tokenized = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        _Tokenize, fn_constructor_args=(model_dir, chat_template, max_len), batch_size=1,
        batch_format="numpy", compute=_pool(min(cpus, len(chunks))), num_cpus=1).materialize()
    meta = tokenized.select_columns(["chunk", "k", "line", "status", "length", "loss_tokens", "error"]
                                    ).to_pandas().sort_values(["chunk", "k"], kind="stable")
    bad = meta[meta["status"] < 0]
    if len(bad):  # the first bad line in file order, with its line number in its file
        c, n = int(bad.iloc[0]["chunk"]), int(bad.iloc[0]["line"])
        lines = sum(_lines(x) for x in chunks[:c] if x["path"] == chunks[c]["path"])
        raise SFTDataError(bad.iloc[0]["error"].replace(LINE, str(lines + n)))
    for status, length, loss in zip(meta["status"], meta["length"], meta["loss_tokens"]):
        count_sample(st, int(status), int(length), int(loss))
    check_stats(st, max_len)
    kept = meta["status"].to_numpy() == KEPT
    lengths = meta["length"].to_numpy()[kept].tolist()
    rows = build_rows(lengths, max_len, packing)
    offsets, dest_kept = row_layout(lengths, rows)
    dest = np.full(len(meta), -1, np.int64)
    dest[np.flatnonzero(kept)] = dest_kept  # meta is in (chunk, k) order: position = base[chunk] + k
    per_chunk = np.bincount(meta["chunk"].to_numpy(), minlength=len(chunks))
    base = np.concatenate([[0], np.cumsum(per_chunk)[:-1]]).astype(np.int64)
    open_rows(rows_dir, offsets)
    written = tokenized.map_batches(_Write, fn_constructor_args=(str(rows_dir), base, dest),
                                    batch_format="pyarrow", compute=_pool(cpus), num_cpus=1).sum("written")
    if written != len(lengths):
        raise RuntimeError(f"wrote {written} of {len(lengths)} samples into {rows_dir}")
    return lengths, rows, st


def _pool(n: int):
    """Actors that grow to n: a busy cluster (branches training) still makes progress on one."""
    import ray.data
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, n))


def _lines(chunk: dict) -> int:
    """Lines that start in a chunk (only read to number a bad line)."""
    with open(chunk["path"], "rb") as f:
        f.seek(chunk["start"])
        data = f.read(chunk["end"] - chunk["start"])
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
