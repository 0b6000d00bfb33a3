"""Reading a source's rows, streamed: local JSONL or parquet (a file, a folder or a glob) or a
Hugging Face dataset, only the columns asked for. The columns of parquet and Hugging Face
sources are known before reading, so a misspelled column fails before any row is read; JSONL
columns are known once the rows have been read.

Hugging Face sources use `datasets` (its Arrow cache is memory-mapped, so iterating does not hold
a large set in memory); `data_files` reads named files of a dataset repository with the packaged
builder of their format (json, parquet, csv): LiveCodeBench's test*.jsonl, whose repository still
holds a loading script that `datasets` refuses to run (and so refuses the repository by name).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from rdistill.config import ConfigError, SourceConfig

BATCH = 256


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield {"__bad__": f"malformed JSON on line {i + 1}: {e.msg}", "__where__": f"line {i + 1}"}
                continue
            if not isinstance(rec, dict):
                yield {"__bad__": f"line {i + 1} is not a JSON object", "__where__": f"line {i + 1}"}
                continue
            rec.setdefault("__where__", f"line {i + 1}")
            yield rec


class SourceReader:
    """One source's rows as dicts. `columns` is the source's column list, or None (JSONL) until
    `rows` has run; `seen_columns` collects the JSONL columns met."""

    def __init__(self, src: SourceConfig, resolve: Callable[[str], str] = str):
        self.src = src
        self.columns: Optional[list[str]] = None
        self.seen_columns: set[str] = set()
        self._files: list[Path] = []
        self._kind = "hf"
        self._hf = None
        if src.path is not None:
            self._files, self._kind = self._local(src.path, resolve)
            if self._kind == "parquet":
                import pyarrow.dataset as pads
                self._pq = pads.dataset([str(f) for f in self._files], format="parquet")
                self.columns = list(self._pq.schema.names)
        else:
            import datasets
            try:
                self._hf = datasets.load_dataset(**self._hf_args(src), split=src.split)
            except Exception as e:  # noqa: BLE001 (hub, network and format errors all end here)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
                raise ConfigError(f"cannot load the Hugging Face dataset {src.hf_name!r}"
                                  f"{' (' + src.hf_subset + ')' if src.hf_subset else ''} split "
                                  f"{src.split!r}: {first}; check the name, or copy it to local "
                                  "files and point the source's path at them") from None
            self.columns = list(self._hf.column_names)

    @staticmethod
    def _hf_args(src: SourceConfig) -> dict:
        """load_dataset's arguments: the dataset and subset, or with data_files the packaged
        builder of their format and the files (hf:// paths in the repository)."""
        if not src.data_files:
            return {"path": src.hf_name, "name": src.hf_subset}
        local = Path(src.hf_name).is_dir()
        files = [f if "://" in f else str(Path(src.hf_name) / f) if local else f"hf://datasets/{src.hf_name}/{f}"
                 for f in src.data_files]
        ext = files[0].rsplit(".", 1)[-1]
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if builder is None:
            raise ConfigError(f"data_files {src.data_files[0]!r}: unknown format .{ext}; name .jsonl, .json, "
                              ".parquet or .csv files")
        return {"path": builder, "data_files": files}

    @staticmethod
    def _local(path: str, resolve: Callable[[str], str]) -> tuple[list[Path], str]:
        p = resolve(path)
        if any(ch in p for ch in "*?["):
            files = [Path(f) for f in sorted(glob.glob(p))]
        elif Path(p).is_dir():
            files = sorted(Path(p).glob("*.parquet")) or sorted(Path(p).glob("*.jsonl"))
        else:
            files = [Path(p)] if Path(p).exists() else []
        if not files:
            raise ConfigError(f"source path {path!r} ({p}) does not exist or holds no .jsonl/.parquet "
                              "files: check the path (toy:<domain>/<split> needs the toy stage first)")
        kinds = {"parquet" if f.suffix == ".parquet" else "jsonl" if f.suffix in (".jsonl", ".json") else f.suffix
                 for f in files}
        if len(kinds) != 1 or not kinds <= {"parquet", "jsonl"}:
            raise ConfigError(f"source path {path!r}: unknown format {sorted(kinds)}; use .jsonl or .parquet files")
        return files, kinds.pop()

    def missing(self, wanted: Iterable[str]) -> list[str]:
        """Columns among `wanted` the source does not have (JSONL: none met in any row)."""
        have = set(self.columns) if self.columns is not None else self.seen_columns
        return [c for c in wanted if c not in have]

    def rows(self, want: Optional[set[str]] = None) -> Iterator[dict]:
        """Every row (the `want` columns of it when given; JSONL rows come whole)."""
        if self._kind == "jsonl":
            for f in self._files:
                for rec in _read_jsonl(f):
                    if len(self._files) > 1 and "__bad__" not in rec:
                        rec["__where__"] = f"{f.name} {rec['__where__']}"
                    self.seen_columns.update(k for k in rec if not k.startswith("__"))
                    yield rec
            return
        cols = [c for c in self.columns if want is None or c in want]
        if self._kind == "parquet":
            for batch in self._pq.to_batches(columns=cols, batch_size=BATCH):
                yield from batch.to_pylist()
            return
        ds = self._hf.select_columns(cols) if len(cols) < len(self.columns) else self._hf
        for start in range(0, len(ds), BATCH):
            chunk = ds[start:start + BATCH]  # a dict of columns: one Arrow slice per batch
            n = len(next(iter(chunk.values()))) if chunk else 0
            for i in range(n):
                yield {c: chunk[c][i] for c in chunk}
