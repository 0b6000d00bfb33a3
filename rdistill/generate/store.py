"""The generate stage's files: input blocks, the checkpointed Ray Data run, and its consolidation.

Layout under the stage's work folder (kept across kills, removed after success):
  input/part-NNNNN.jsonl     the rows to generate, `block_rows` per file (= per block)
  out/                       rows written by Ray Data (one file per committed block)
  ckpt/                      Ray Data's row checkpoints: ids of committed rows
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from rdistill.log import log

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
INPUT_SCHEMA = pa.schema([
    ("row_key", pa.string()), ("id", pa.string()), ("prompt_id", pa.string()), ("sample_idx", pa.int64()),
    ("domain", pa.string()), ("messages", MESSAGES), ("prompt", pa.string()), ("gold", pa.string()),
    ("tests", pa.string()), ("entry_point", pa.string()), ("teacher", pa.string()),
    ("sampling", pa.string()), ("seed", pa.int64()),
])
# The stage's output contract (the verify stage reads exactly these columns).
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_id", pa.string()), ("sample_idx", pa.int64()), ("domain", pa.string()),
    ("messages", MESSAGES), ("prompt", pa.string()), ("completion", pa.string()),
    ("finish_reason", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("teacher", pa.string()), ("sampling", pa.string()), ("error", pa.string()), ("gold", pa.string()),
    ("tests", pa.string()), ("entry_point", pa.string()),
])
PENDING = ".pending.parquet"


def write_inputs(rows: list[dict], folder: Path, block_rows: int) -> int:
    """Write the rows in files of `block_rows` (once: a resumed run reuses them, so block
    boundaries and ids stay what the checkpoint recorded). Returns the number of files."""
    done = folder / "_COMPLETE"
    if done.exists():
        return len(list(folder.glob("part-*.jsonl")))
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for n, start in enumerate(range(0, len(rows), block_rows)):
        chunk = pa.Table.from_pylist(rows[start:start + block_rows], schema=INPUT_SCHEMA).to_pylist()
        (folder / f"part-{n:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    done.write_text("")
    return n + 1


def _tables(folder: Path, pending_ok: bool = False) -> list[tuple[Path, pa.Table]]:
    out = []
    for p in sorted(folder.glob("*.parquet")) if folder.exists() else []:
        if p.name.endswith(PENDING) and not pending_ok:
            continue
        try:
            out.append((p, pq.read_table(p)))
        except Exception as e:  # noqa: BLE001 - a file cut by a kill: its rows were never committed
            log.warning("generate: ignoring unreadable %s (%s)", p.name, e)
    return out


def committed_ids(ckpt: Path) -> set:
    """Row keys whose block Ray Data committed (the data file was fully written)."""
    ids: set = set()
    for _, t in _tables(ckpt):
        ids.update(t.column("row_key").to_pylist())
    return ids


def _rewrite_without(path: Path, table: pa.Table, keys: set) -> None:
    keep = pa.array([k not in keys for k in table.column("row_key").to_pylist()])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table.filter(keep), tmp)
    os.replace(tmp, path)


def forget_errors(out: Path, ckpt: Path) -> set:
    """Drop rows that failed after retries in an earlier attempt (from both the written data
    and the checkpoint) so this run sends them again. Returns their keys."""
    bad: set = set()
    for _, t in _tables(out):
        if "finish_reason" in t.column_names:
            fr = t.column("finish_reason").to_pylist()
            bad.update(k for k, r in zip(t.column("row_key").to_pylist(), fr) if r == "error")
    if bad:
        log.info("generate: %d row(s) failed in the previous attempt; sending them again", len(bad))
        for folder in (out, ckpt):
            for p, t in _tables(folder):
                _rewrite_without(p, t, bad)
    return bad


def run_checkpointed(inputs: Path, out: Path, ckpt: Path, transform: Callable) -> None:
    """read_parquet -> transform -> write_parquet under Ray Data's row-level checkpointing."""
    import ray
    from ray.data.checkpoint import CheckpointConfig
    ctx = ray.data.DataContext.get_current()
    saved = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(id_column="row_key", checkpoint_path=str(ckpt),
                                             delete_checkpoint_on_success=False)
    try:
        # JSONL: read_json makes one block per file (read_parquet in ray 2.60 merges small
        # files into one block, and the block is the unit a kill repeats).
        files = len(list(inputs.glob("part-*.jsonl")))
        ds = ray.data.read_json(str(inputs), override_num_blocks=files, file_extensions=["jsonl"])
        transform(ds).write_parquet(str(out))
    finally:
        ctx.checkpoint_config = saved


def consolidate(out: Path, expected: list[str]) -> tuple[pa.Table, int]:
    """All written rows, each expected key exactly once (a block written twice keeps its first
    copy). Raises if a row is missing."""
    tables = [t for _, t in _tables(out)]
    if not tables:
        raise RuntimeError(f"generate: no rows were written to {out}")
    table = pa.concat_tables(tables, promote_options="permissive")
    keys = table.column("row_key").to_pylist()
    first: dict = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    missing = set(expected) - first.keys()
    if missing:
        raise RuntimeError(f"generate: {len(missing)} row(s) missing after the write (e.g. "
                           f"{sorted(missing)[:3]}); rerun the stage to generate them")
    dups = len(keys) - len(first)
    if dups:
        log.warning("generate: dropped %d duplicate row(s)", dups)
    want = set(expected)
    idx = sorted(i for k, i in first.items() if k in want)
    return table.take(pa.array(idx, pa.int64())), dups


def write_domains(table: pa.Table, dest: Path, stats: dict) -> dict:
    """One `<domain>.parquet` per domain in the output contract's schema, sorted by prompt and
    sample; per-domain counts go into `stats`. Returns the totals."""
    import pyarrow.compute as pc
    totals = {"error_rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "finish_reasons": {}}
    for dom in stats:
        t = table.filter(pc.equal(table.column("domain"), dom))
        t = t.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        t = t.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
        pq.write_table(t, dest / f"{dom}.parquet")
        reasons = {k: int(v) for k, v in zip(*[x.to_pylist() for x in
                                               pc.value_counts(t.column("finish_reason")).flatten()])}
        s = stats[dom]
        s.update(written=t.num_rows, finish_reasons=reasons, error_rows=reasons.get("error", 0),
                 prompt_tokens=int(pc.sum(t.column("prompt_tokens")).as_py() or 0),
                 completion_tokens=int(pc.sum(t.column("completion_tokens")).as_py() or 0))
        for k in ("error_rows", "prompt_tokens", "completion_tokens"):
            totals[k] += s[k]
        for k, v in reasons.items():
            totals["finish_reasons"][k] = totals["finish_reasons"].get(k, 0) + v
    return totals


class DomainWriter:
    """Rows of one domain streamed into `<domain>.parquet` in the output contract's schema
    (imported traces: no checkpointing, an interrupted import simply starts over)."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.writer = pq.ParquetWriter(self.tmp, OUTPUT_SCHEMA)

    def write(self, rows: list[dict]) -> None:
        if rows:
            self.writer.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))

    def __enter__(self) -> "DomainWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def domain_totals(path: Path) -> dict:
    """A written domain file's counts: rows, finish reasons, error rows, prompt/completion tokens."""
    import pyarrow.compute as pc
    t = pq.read_table(path, columns=["finish_reason", "prompt_tokens", "completion_tokens"])
    reasons = {k: int(v) for k, v in zip(*[x.to_pylist() for x in
                                           pc.value_counts(t.column("finish_reason")).flatten()])} if t.num_rows else {}
    return {"written": t.num_rows, "finish_reasons": reasons, "error_rows": reasons.get("error", 0),
            "prompt_tokens": int(pc.sum(t.column("prompt_tokens")).as_py() or 0),
            "completion_tokens": int(pc.sum(t.column("completion_tokens")).as_py() or 0)}


def summed(stats: dict) -> dict:
    """Token and finish-reason totals over domains' stats."""
    out = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reasons": {}}
    for s in stats.values():
        out["prompt_tokens"] += s.get("prompt_tokens", 0)
        out["completion_tokens"] += s.get("completion_tokens", 0)
        for k, v in s.get("finish_reasons", {}).items():
            out["finish_reasons"][k] = out["finish_reasons"].get(k, 0) + v
    return out
