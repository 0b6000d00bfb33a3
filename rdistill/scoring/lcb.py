"""LiveCodeBench-style code tests, run the way the official lcb_runner grades them.

A record's `tests` is JSON `{"format": "lcb", "fn_name": ..., "public": [cases],
"private": "<packed>" | [cases], "private_file": "<path of the packed string>"}`, a case being
`{input, output, testtype}`; the packed private tests stay packed (base64 of zlib of a pickled
JSON string, as LCB lite ships them) until the verifier decodes them, since decoded they are
gigabytes. APPS/TACO-style call-based tests (OpenThoughts code: `{"inputs", "outputs",
"fn_name"}`) use the same harness with APPS' comparison.

The whole test list runs in one sandboxed program (`run_program`), like lcb_runner's one process
per problem: the program is compiled with lcb_runner's import preamble (so `sys.setrecursionlimit`
and the star imports it grants hold here too), each test has lcb_runner's 6 s timeout (SIGALRM),
the first failing test stops the run, and the whole run has lcb_runner's global limit,
(timeout + 1) x tests + 5 s.
- stdin problems: the program runs as `__main__` per test with the input on file descriptor 0 and
  its output captured from descriptor 1 (input(), sys.stdin, open(0), print and os.write all
  work as in a real process); lcb_runner's comparison: output and expected stripped, split in
  lines, each line equal as text or, failing that, as a list of Decimals.
- functional (LeetCode) problems: the module is executed once, `Solution()` built when the code
  has `class Solution`, then `method(*args)` per test with args parsed from the input lines as
  JSON; a tuple result counts as a list; equal to the expected output parsed as JSON.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
import secrets
import zlib
from typing import Any, Optional

from rdistill.config import SandboxConfig

TEST_TIMEOUT_S = 6  # lcb_runner's default --timeout, per test
MEMORY_MB = 4096  # lcb_runner's reliability guard figure; the sandbox's own limit when larger

# lcb_runner.evaluation.testing_util.import_string, verbatim: programs graded officially get it.
IMPORTS = ("from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
           "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\n"
           "from random import *\nfrom statistics import *\nfrom itertools import *\nfrom functools import *\n"
           "from operator import *\nfrom io import *\nfrom sys import *\nfrom json import *\n"
           "from builtins import *\nfrom typing import *\nimport string\nimport re\nimport datetime\n"
           "import collections\nimport heapq\nimport bisect\nimport copy\nimport math\nimport random\n"
           "import statistics\nimport itertools\nimport functools\nimport operator\nimport io\nimport sys\n"
           "import json\nsys.setrecursionlimit(50000)\n")

HARNESS = r'''
import builtins, io, json, os, signal, sys, types
from decimal import Decimal
spec = json.loads(sys.stdin.buffer.read())
verdict_fd = os.dup(1)
class _Timeout(BaseException):
    pass
def _alarm(*_):
    raise _Timeout()
signal.signal(signal.SIGALRM, _alarm)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a huge output fails the write, not the harness
# Anonymous in-memory files: the sandbox's /tmp is not writable by the program's uid.
IN, OUT = os.memfd_create("lcb_in"), os.memfd_create("lcb_out")
def _redirect(data):
    os.ftruncate(IN, 0)
    os.lseek(IN, 0, 0)  # fd 0 shares this offset: the last test's reads moved it
    with open(IN, "wb", closefd=False) as f:
        f.write(data.encode("utf-8"))
    os.lseek(IN, 0, 0)
    os.ftruncate(OUT, 0)
    os.lseek(OUT, 0, 0)
    os.dup2(IN, 0)
    os.dup2(OUT, 1)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
def _captured():
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.lseek(OUT, 0, 0)
    with open(OUT, "rb", closefd=False) as f:
        return f.read().decode("utf-8", "replace")
def _lines(s):
    return [x.strip() for x in s.strip().split("\n")]
def _same_stdio(pred, gt):
    a, b = _lines(pred), _lines(gt)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            if [Decimal(e) for e in x.split()] != [Decimal(e) for e in y.split()]:
                return False
        except Exception:
            return False
    return True
def _short(x, n=200):
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[:n // 2] + "..." + s[-n // 2:]
def _done(status, i, detail=""):
    os.write(verdict_fd, (spec["nonce"] + json.dumps({"status": status, "passed": i, "case": i,
                                                       "detail": detail}) + "\n").encode())
    os._exit(0)
def _timed(fn):
    signal.setitimer(signal.ITIMER_REAL, spec["timeout"])
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
code, cases = spec["code"], spec["cases"]
try:
    preamble = compile(spec["imports"], "<imports>", "exec")
    compiled = compile(code, "<solution>", "exec")
except BaseException as e:
    _done("compile_error", 0, _short(f"{type(e).__name__}: {e}"))
if spec["mode"] == "stdin":
    for i, c in enumerate(cases):
        _redirect(c["input"])
        try:
            g = {"__name__": "__main__", "__builtins__": builtins}
            exec(preamble, g)
            _timed(lambda: exec(compiled, g))
        except SystemExit:
            pass
        except _Timeout:
            _done("timeout", i, "time limit exceeded")
        except BaseException as e:
            _done("runtime_error", i, _short(f"{type(e).__name__}: {e}"))
        got = _captured()
        if not _same_stdio(got, c["output"]):
            _done("wrong_answer", i, f"got {_short(got)!r}, expected {_short(c['output'])!r}")
    _done("passed", len(cases))
_redirect("")
mod = types.ModuleType("tmp_sol")
try:
    exec(preamble, mod.__dict__)
    _timed(lambda: exec(compiled, mod.__dict__))
    obj = mod.Solution() if "class Solution" in code else mod
    method = getattr(obj, spec["fn_name"])
except _Timeout:
    _done("timeout", 0, "time limit exceeded while loading")
except BaseException as e:
    _done("compile_error", 0, _short(f"{type(e).__name__}: {e}"))
for i, c in enumerate(cases):
    if spec["mode"] == "functional":
        args = [json.loads(line) for line in c["input"].split("\n")]
        want = json.loads(c["output"])
    else:  # APPS call-based: args as a list, expected output possibly wrapped in a list
        args = c["input"] if isinstance(c["input"], list) else [c["input"]]
        want = c["output"]
    try:
        got = _timed(lambda: method(*args))
    except _Timeout:
        _done("timeout", i, "time limit exceeded")
    except BaseException as e:
        _done("runtime_error", i, _short(f"{type(e).__name__}: {e}"))
    if isinstance(got, tuple):
        got = list(got)
    ok = got == want or (spec["mode"] == "apps" and isinstance(want, list) and len(want) > 0 and got == want[0])
    if not ok:
        _done("wrong_answer", i, f"got {_short(got)}, expected {_short(want)}")
_done("passed", len(cases))
'''


def unpack(private: Any) -> list[dict]:
    """LCB private tests as cases: a JSON list (or its text), else lcb_runner's packing
    json.loads(pickle.loads(zlib.decompress(base64.b64decode(s))))."""
    if private is None or private == "":
        return []
    if isinstance(private, list):
        return private
    try:
        out = json.loads(private)
    except ValueError:
        out = json.loads(pickle.loads(zlib.decompress(base64.b64decode(private.encode("utf-8")))))
    return out if isinstance(out, list) else []


def spec_of(tests: str) -> Optional[dict]:
    """The LCB or APPS call-based test spec in a record's `tests`, or None for other tests."""
    s = (tests or "").lstrip()
    if not s.startswith("{"):
        return None
    try:
        data = json.loads(s)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") == "lcb":
        return data
    if data.get("fn_name") and isinstance(data.get("inputs"), list):
        cases = [{"input": i, "output": o} for i, o in zip(data["inputs"], data.get("outputs") or [])]
        return {"format": "apps", "fn_name": data["fn_name"], "cases": cases}
    return None


def cases_of(spec: dict) -> tuple[str, list[dict]]:
    """(mode, cases) of a spec: mode stdin | functional | apps; private tests decoded now."""
    if spec.get("format") == "apps":
        return "apps", spec["cases"]
    private = spec.get("private")
    if spec.get("private_file"):
        with open(spec["private_file"], encoding="utf-8") as f:
            private = f.read()
    cases = list(spec.get("public") or []) + unpack(private)
    functional = bool(spec.get("fn_name")) and any(c.get("testtype") == "functional" for c in cases)
    return ("functional" if functional else "stdin"), cases


def run_tests(program: str, spec: dict, sandbox: Optional[SandboxConfig]) -> dict:
    """Grade `program` against the spec's tests in the sandbox: {status, passed, total, case,
    detail, infra}; status passed | wrong_answer | runtime_error | timeout | compile_error |
    no_tests | missing_tests (a packed test file not readable here: infra) | a sandbox status."""
    from rdistill.scoring.sandbox import run_program
    try:
        mode, cases = cases_of(spec)
    except OSError as e:
        return {"status": "missing_tests", "passed": 0, "total": 0, "case": None, "infra": True,
                "detail": f"private tests unreadable: {e.strerror}: {spec.get('private_file')}"}
    if not cases:
        return {"status": "no_tests", "passed": 0, "total": 0, "case": None, "detail": "", "infra": False}
    base = sandbox or SandboxConfig()
    wall = (TEST_TIMEOUT_S + 1) * len(cases) + 5  # lcb_runner's global timeout
    cfg = dataclasses.replace(base, timeout_s=float(wall), cpu_s=int(wall) + 1,
                              memory_mb=max(base.memory_mb, MEMORY_MB))
    nonce = secrets.token_hex(8)
    payload = json.dumps({"code": program, "cases": cases, "mode": mode, "fn_name": spec.get("fn_name"),
                          "timeout": TEST_TIMEOUT_S, "imports": IMPORTS,
                          "nonce": nonce})
    res = run_program(HARNESS, payload, cfg)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(nonce):
            out = json.loads(line[len(nonce):])
            out.update(total=len(cases), infra=False)
            return out
    # No verdict: the harness died (memory, a crash in C code, the global wall-clock limit).
    status = res.status if res.status != "ok" else "runtime_error"
    last = res.stderr.strip().splitlines()[-1:] or [""]
    return {"status": status, "passed": 0, "total": len(cases), "case": None, "infra": res.infra,
            "detail": (res.detail or last[0])[:200]}
