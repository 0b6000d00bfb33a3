"""The run directory: one folder per stage, each finished by a manifest, written atomically.

Layout: `<run_dir>/<stage>/...` holds a stage's artifacts and `manifest.json`;
`<run_dir>/.work/<stage>/` holds resumable state (Ray Data checkpoints, Ray Train checkpoints)
that survives a kill and is removed when the stage completes. A stage's folder only ever
appears complete: it is built under a temporary name and renamed, manifest included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-able object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (an SFT set, a data file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def listing_hash(root: Path) -> str:
    """Hash of a folder's file names and sizes: cheap even for 64 GB of weights, and it changes
    whenever a stage rewrites its artifacts with different content lengths or names."""
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            entries.append((str(p.relative_to(root)), p.stat().st_size))
    return stable_hash(entries)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name, then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class RunDir:
    """A run directory: stage folders, their manifests and their resumable work folders."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def work_dir(self, stage: str) -> Path:
        return self.root / ".work" / stage

    def manifest(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / MANIFEST
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def fingerprint(self, stage: str) -> str | None:
        m = self.manifest(stage)
        return m["fingerprint"] if m else None

    @contextmanager
    def building(self, stage: str) -> Iterator[Path]:
        """Yield a fresh temporary folder; on success it replaces `<run_dir>/<stage>`.
        On error it is removed and the previous complete folder (if any) stays."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{stage}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
        for stale in self.root.glob(f".{stage}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.stage_dir(stage)
        if final.exists():
            old = self.root / f".{stage}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
