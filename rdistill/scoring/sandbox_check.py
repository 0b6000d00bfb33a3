"""A sandbox self-check: before code is scored, run a trivial program and a failing one through
the configured sandbox. A sandbox that cannot start the interpreter would otherwise mark every
code sample wrong, and the run would go on to train on an empty code set.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

from rdistill.config import SandboxConfig
from rdistill.errors import ResourceError

_passed: set = set()  # configurations that passed in this process


class SandboxUnavailable(ResourceError):
    """The code sandbox cannot run programs; the message says what failed and how to fix it."""


def _fix(detail: str, python: str, bwrap: bool) -> str:
    from rdistill.scoring.sandbox_mounts import unreachable
    why = unreachable(python) if os.geteuid() == 0 else None
    if why:
        return why
    if "No such file" in detail or "Permission denied" in detail:
        if not bwrap and os.geteuid() == 0:
            return ("without bubblewrap the program runs as an unprivileged uid that cannot reach the "
                    f"interpreter {python}: install bubblewrap (apt-get install bubblewrap), which mounts it in")
        return f"the interpreter {python} is not reachable inside the sandbox: set verify.sandbox.python"
    if "namespace" in detail or "Operation not permitted" in detail:
        return ("bubblewrap cannot create namespaces here (a container without user namespaces?): allow "
                "them (sysctl kernel.unprivileged_userns_clone=1) or run where they are allowed")
    return "run `python -m rdistill.scoring.sandbox PROGRAM.py` to see the sandbox's full output"


def check_sandbox(cfg: Optional[SandboxConfig] = None, what: str = "code scoring") -> dict:
    """Raise SandboxUnavailable (one line) unless a trivial program passes and a failing one fails
    with its assertion through the sandbox `cfg` describes; returns what was checked. Cached per
    process and configuration, so stages and tasks can call it freely."""
    from rdistill.scoring.sandbox import have_bwrap, run_program
    from rdistill.scoring.sandbox_mounts import _prefixes
    cfg = cfg or SandboxConfig()
    python = cfg.python or sys.executable
    key = (python, cfg.timeout_s, cfg.cpu_s, cfg.memory_mb, cfg.max_procs)
    if key in _passed:
        return {"python": python, "cached": True}
    if not (os.path.isfile(python) and os.access(python, os.X_OK)) and not shutil.which(python):
        raise SandboxUnavailable(f"{what}: the sandbox's interpreter {python} does not exist or is not "
                                 "executable: set verify.sandbox.python to a Python interpreter")
    bwrap = have_bwrap()
    ok = run_program("import sys\nprint(6 * 7)\nprint(sys.prefix)", None, cfg)
    if ok.status != "ok" or ok.stdout.split()[:1] != ["42"]:
        detail = ok.detail or (ok.stderr.strip().splitlines() or [ok.stdout.strip()[:80]])[-1]
        raise SandboxUnavailable(f"{what}: the code sandbox cannot run a trivial program ({ok.status}: "
                                 f"{detail}); {_fix(detail, python, bwrap)}")
    want = _prefixes(python)[:1]
    got = [os.path.realpath(p) for p in ok.stdout.split()[1:2]]
    if want and got != [os.path.realpath(want[0])]:
        raise SandboxUnavailable(f"{what}: inside the code sandbox the interpreter {python} starts without "
                                 f"its environment (sys.prefix {got[0] if got else '?'} instead of {want[0]}); "
                                 f"{_fix('Permission denied', python, bwrap)}")
    bad = run_program("assert 1 + 1 == 3, 'self-check'", None, cfg)
    if bad.status != "error" or not bad.detail.startswith("AssertionError"):
        raise SandboxUnavailable(f"{what}: the code sandbox does not report a failing program as failed "
                                 f"(got {bad.status}: {bad.detail or bad.stderr[-120:]!r}); "
                                 f"{_fix(bad.detail, python, bwrap)}")
    _passed.add(key)
    return {"python": python, "isolation": ok.isolation, "wall_s": round(ok.wall_s + bad.wall_s, 3)}
