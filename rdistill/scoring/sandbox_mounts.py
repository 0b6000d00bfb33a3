"""What the sandbox must mount so that the interpreter starts wherever it lives.

The sandbox hides /tmp, /root, /home and /run behind empty tmpfs mounts and, as root, runs the
program as a fresh unprivileged uid. An interpreter in a venv under `mktemp -d` (/tmp, a 0700
folder), under /root (pyenv), or below any folder that uid cannot enter would then not start
(`setpriv: failed to execute ...: No such file or directory`). So each folder the interpreter
needs (its venv, its base installation, the targets of its symlinks) is bound back read-only at
its own path, and a folder above it that the sandbox uid cannot traverse is replaced by an empty
tmpfs with the needed folders bound into it: the program sees exactly those folders there and
nothing else of the host's private trees.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
from dataclasses import dataclass

# Hidden behind empty tmpfs mounts inside the sandbox (the program gets its own /tmp and /dev/shm).
MASKED = ("/tmp", "/dev/shm", "/root", "/home", "/run")


@dataclass(frozen=True)
class Mounts:
    exe: str
    """The interpreter's path to execute inside (directory symlinks resolved, the file's own
    name kept: a venv is found next to the path Python was started as)."""
    tmpfs: tuple[str, ...]
    """Folders the sandbox uid cannot traverse, each replaced by an empty tmpfs."""
    binds: tuple[str, ...]
    """Folders bound back read-only at their own path (parents before children)."""
    parents: tuple[str, ...] = ()
    """Folders created (0755) inside the tmpfs mounts to hold the binds."""


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _symlink_chain(path: str) -> list[str]:
    """`path` and every file it leads to through symlinks (absolute, in order)."""
    out, seen = [path], {path}
    while os.path.islink(out[-1]):
        nxt = os.readlink(out[-1])
        nxt = os.path.normpath(os.path.join(os.path.dirname(out[-1]), nxt))
        if nxt in seen:
            break
        out.append(nxt)
        seen.add(nxt)
    return out


def _install_root(exe: str) -> str:
    """The folder holding bin/<python> (a venv, conda env or installation prefix)."""
    d = os.path.dirname(exe)
    return os.path.dirname(d) if os.path.basename(d) in ("bin", "Scripts") else d


@functools.lru_cache(maxsize=8)
def _prefixes(python: str) -> tuple[str, ...]:
    """The interpreter's own view of where it lives (asked once per interpreter)."""
    code = "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
    try:
        out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60)
        return tuple(json.loads(out.stdout)) if out.returncode == 0 else ()
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return ()


def _traversable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def needed_folders(python: str) -> list[str]:
    """Real (symlink-free) folders the interpreter needs: its install root and those of every
    symlink target on the way to the real binary, and the prefixes it reports."""
    exe = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(python))), os.path.basename(python))
    roots = {os.path.realpath(_install_root(p)) for p in _symlink_chain(exe)}
    roots |= {os.path.realpath(p) for p in _prefixes(exe) if p}
    roots = {r for r in roots if os.path.isdir(r) and r != "/"}
    # keep the outermost folders only: a bind of a folder carries everything below it
    return sorted(r for r in roots if not any(o != r and _under(r, o) for o in roots))


@functools.lru_cache(maxsize=8)
def mounts_for(python: str, privileged_uid_drop: bool) -> Mounts:
    """The tmpfs masks and binds that make `python` start inside the sandbox. With the uid drop,
    a folder above a needed one that others cannot traverse (a 0700 `mktemp -d`) is masked."""
    exe = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(python))), os.path.basename(python))
    binds, masks = [], set()
    for root in needed_folders(python):
        hidden = any(_under(root, m) for m in MASKED)
        blocker = None
        if privileged_uid_drop:
            parts = root.split("/")
            for i in range(2, len(parts)):  # ancestors below /, outermost first
                anc = "/".join(parts[:i])
                if any(_under(anc, m) for m in MASKED):
                    break  # inside a masked tree bwrap creates the parents itself (0755)
                if not _traversable_by_others(anc):
                    blocker = anc
                    break
        if blocker:
            masks.add(blocker)
        if hidden or blocker:
            binds.append(root)
    tops = list(masks) + list(MASKED)
    parents = set()
    for b in binds:
        top = max((t for t in tops if _under(b, t) and t != b), key=len, default=None)
        anc = os.path.dirname(b)
        while top and anc != top and _under(anc, top):
            parents.add(anc)
            anc = os.path.dirname(anc)
    depth = lambda p: (p.count("/"), p)  # noqa: E731
    return Mounts(exe, tuple(sorted(masks, key=depth)), tuple(sorted(binds, key=depth)),
                  tuple(sorted(parents, key=depth)))


def unreachable(python: str) -> str | None:
    """Why the sandbox uid still could not read the interpreter after the mounts (a needed folder
    itself closed to others), or None."""
    for root in needed_folders(python):
        if not (_traversable_by_others(root) and os.stat(root).st_mode & stat.S_IROTH):
            return (f"{root} (needed by the interpreter {python}) is closed to other users (mode "
                    f"{stat.S_IMODE(os.stat(root).st_mode):o}): chmod o+rx it, or set "
                    "verify.sandbox.python to an interpreter in a world-readable folder")
    return None
