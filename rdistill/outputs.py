"""The folders a run writes (the run directory, a local tracking store), tried before any work.

The run directory is the first thing every run writes, so it is tried first, before Ray starts,
before the stages' heavy imports: each folder is created (parents included), a probe file is
written and removed, and the run directory's free space is compared with the dry run's disk
estimate. A failure is one line naming the folder and the reason, and leaves nothing behind: the
folders this check created are removed again. On a cluster, `check_nodes_see` then asks a task
on every node whether it sees the same run directory (storage that only the driver's node has is
the usual multi-node mistake).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, Union
from urllib.parse import unquote, urlparse

from rdistill.errors import ResourceError

def _local_store(uri: str) -> Optional[tuple[Path, bool]]:
    """(the folder an MLflow URI writes to, whether the URI names a file in it) for local stores:
    sqlite:///relative.db, sqlite:////absolute.db, file:///folder or a plain folder path;
    None for servers and databases elsewhere (http, databricks, postgresql, in-memory sqlite)."""
    if uri.split(":", 1)[0] in ("databricks", "databricks-uc", "uc"):  # MLflow's names for remote stores
        return None
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return (Path(path).absolute(), True) if path and path != ":memory:" else None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).absolute(), False
    if not parsed.scheme or len(parsed.scheme) == 1:  # a plain path (a Windows drive letter too)
        return Path(uri).absolute(), False
    return None


def output_dirs(cfg) -> list[tuple[str, Path]]:
    """(the setting that names it, folder) of every folder a run writes into, run_dir first."""
    out = [("run_dir", Path(cfg.run_dir).absolute())]
    t = cfg.tracking
    if t.backend == "mlflow":
        uri, what = (t.uri, "tracking.uri") if t.uri else (os.environ.get("MLFLOW_TRACKING_URI"),
                                                             "MLFLOW_TRACKING_URI")
        store = _local_store(uri) if uri else None  # unset: a SQLite store inside run_dir
        if store is not None:
            path, is_file = store
            if is_file and path.is_dir():
                raise ResourceError(f"{what}={uri}: {path} is a directory, not a database file: "
                                    f"name a file, e.g. sqlite:///{path}/mlflow.db")
            out.append((f"{what}={uri}", path.parent if is_file else path))
    elif t.backend == "wandb" and os.environ.get("WANDB_DIR"):  # offline runs are written there
        out.append(("WANDB_DIR", Path(os.environ["WANDB_DIR"]).absolute()))
    return out


def _where(what: str, path: Path) -> str:
    return f"{what} {path}" if what == "run_dir" else f"{what} (folder {path})"


def _failure(what: str, path: Path, e: OSError, doing: str) -> ResourceError:
    """One line for an OSError met while creating (`doing`=mkdir) or probing a folder."""
    name = what.split("=")[0]
    fix, at = f"point {name} at a writable disk", e.filename or path
    if e.errno == errno.EROFS:
        why = "is on a read-only filesystem"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        why, fix = f"has no space left ({e.strerror})", f"free space or point {name} at a larger disk"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = (f"cannot be created: no permission to create {at} ({e.strerror})" if doing == "mkdir"
               else f"is not writable ({e.strerror} writing a file there)")
        fix = f"fix the permissions or {fix}"
    elif e.errno == errno.ENOTDIR:
        why = f"cannot be created: a part of {at} is a file, not a directory"
    else:
        why = f"cannot be created: {doing} {at} failed ({e.strerror or type(e).__name__})"
    return ResourceError(f"{_where(what, path)} {why}: {fix}")


def _try_dir(what: str, path: Path, created: list[Path]) -> None:
    """Create `path` (appending each folder made to `created`), write and remove a probe file."""
    missing, p = [], path
    while not os.path.lexists(p):  # the folders to make, deepest first
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        kind = "a link to nothing" if p.is_symlink() and not p.exists() else "a file"
        first = "" if p == path else f"cannot be created: {p} "
        raise ResourceError(f"{_where(what, path)} {first}is {kind}, not a directory: remove it or point "
                            f"{what.split('=')[0]} elsewhere")
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:  # made meanwhile by another process
            if d.is_dir():
                continue
            raise ResourceError(f"{_where(what, path)} cannot be created: {d} appeared meanwhile as a file"
                                ) from None
        except OSError as e:
            raise _failure(what, path, e, "mkdir") from None
        created.append(d)
    probe = path / f".rdistill-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"rdistill preflight probe\n")
        finally:
            os.close(fd)
    except OSError as e:
        raise _failure(what, path, e, "write") from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def check_outputs(cfg, need_bytes: Union[float, Callable[[], float]] = 0.0) -> None:
    """Every output folder can be created and written, and run_dir's disk has `need_bytes` free
    (a callable is called after the folders passed: the entry point computes the estimate only
    then). Raises a one-line ResourceError and removes the folders it created on any failure."""
    created: list[Path] = []
    try:
        dirs = output_dirs(cfg)
        for what, path in dirs:
            _try_dir(what, path, created)
        need = need_bytes() if callable(need_bytes) else need_bytes
        root = dirs[0][1]
        free = shutil.disk_usage(root).free
        if need > free:
            from rdistill.estimates import _gb
            raise ResourceError(f"run_dir {root} has {_gb(free)} free but the run needs about {_gb(need)} (the "
                                "dry run's estimate): free space or point run_dir at a larger disk")
    except BaseException:
        for d in reversed(created):  # deepest first; only empty folders this check made
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise


def node_sees(path: str, marker: str, token: str) -> Optional[str]:
    """On a node: None if `path` is the driver's folder (its marker file reads `token`) and a file
    can be written there, else what is wrong (a Ray task body; no Ray import needed)."""
    if not os.path.isdir(path):
        return "does not exist"
    try:
        with open(os.path.join(path, marker)) as f:
            seen = f.read()
    except OSError:
        seen = None
    if seen != token:
        return "is not the driver's folder there (the driver's files are not visible: a local disk?)"
    probe = os.path.join(path, f".rdistill-probe-{uuid.uuid4().hex}")
    try:
        with open(probe, "w") as f:
            f.write("probe\n")
        os.unlink(probe)
    except OSError as e:
        return f"is not writable ({e.strerror})"
    return None


def check_nodes_see(run_dir: Union[str, Path], timeout_s: float = 120.0) -> None:
    """On a cluster: a zero-CPU task on every alive node checks that it sees the driver's run
    directory and can write to it; raises a one-line ResourceError naming the first node that
    cannot. A node that does not answer within `timeout_s` (a worker still setting up) is
    warned about, not failed."""
    import ray

    from rdistill.log import log
    from rdistill.topology import on_each_node
    root = Path(run_dir).absolute()
    token = uuid.uuid4().hex
    marker = root / f".rdistill-nodes-{token[:12]}"
    marker.write_text(token)
    try:
        refs = on_each_node(node_sees, str(root), marker.name, token)
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            problem = ray.get(ref)
            if problem:
                n = refs[ref]
                raise ResourceError(f"run_dir {root} {problem} on node {n['NodeManagerAddress']} (id {n['NodeID']}): "
                                    "put run_dir on storage every node mounts at the same path (NFS, Lustre, ...)")
        for ref in late:
            ray.cancel(ref, force=True)
            n = refs[ref]
            log.warning("node %s (id %s) did not say within %.0fs whether it sees run_dir %s",
                        n["NodeManagerAddress"], n["NodeID"], timeout_s, root)
    finally:
        marker.unlink(missing_ok=True)
