"""The public scoring API, shared by the verify stage and the evaluation:

    score(kind, completion, record, sandbox=None) -> Verdict
    score_batch(kind, rows, sandbox=None) -> list[Verdict]          (plain lists)
    score_frame(df, kind=None, sandbox=None) -> df                  (Ray Data map_batches, pandas)
    score_dataset(ds, kind, sandbox=None) -> ds                     (a Ray Dataset, in parallel)

`record` holds `gold` (math: the answer; science: the letter), `tests` (code: Python asserts run
after the program, or a JSON list of {input, output} stdin/stdout cases) and `entry_point` (code: the function's name; HumanEval-style tests that
define `check(candidate)` get `check(<entry_point>)` appended). Importing this starts nothing.

math-verify bounds its parse/verify with SIGALRM, which only works on a process's main thread:
on the main thread (Ray tasks run there) it is used as is; on any other thread (threaded actors,
thread pools) each call goes to a helper process, where it is the main thread again, bounded by a
wall-clock wait that kills the helper when it hangs.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from rdistill.config import SandboxConfig
from rdistill.verify.extract import choice_letter, code_block, final_answer, gold_letter

KINDS = ("math", "code", "science")
MATH_TIMEOUT_S = 5


@dataclass
class Verdict:
    correct: bool
    reason: str
    """Why, in a few words: 'correct', 'wrong answer', 'no answer found', 'tests failed: ...'."""
    extracted: Optional[str] = None
    """The answer that was judged (the parsed value, the chosen letter, the program)."""
    infra: bool = False
    """No verdict on the answer: the sandbox or the machine failed (counted apart, never as wrong)."""


def _field(record: dict, key: str) -> Optional[str]:
    """A record's text field; None for missing, null or NaN (pandas' null in object columns)."""
    v = record.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
        return str(v)  # a numeric gold such as 85
    return v if isinstance(v, str) else None


def _gold_text(gold: str) -> str:
    g = gold.strip()
    return g if ("$" in g or "\\boxed" in g) else f"${g}$"


def _math(completion: str, gold: Optional[str], timeout: Optional[int]) -> tuple[bool, str, Optional[str]]:
    from math_verify import parse, verify
    if gold is None or not str(gold).strip():
        return False, "record has no gold answer", None
    g = parse(_gold_text(str(gold)), parsing_timeout=timeout)
    if not g:
        return False, f"gold answer {gold!r} does not parse", None
    p = parse(final_answer(completion), parsing_timeout=timeout)
    if not p:
        return False, "no answer found", None
    shown = str(p[-1]) if len(p) > 1 else str(p[0])
    ok = verify(g, p, timeout_seconds=timeout)
    return bool(ok), "correct" if ok else "wrong answer", shown


_pool: Optional[cf.ProcessPoolExecutor] = None
_pool_lock = threading.Lock()


def _math_off_main_thread(completion: str, gold: Optional[str]) -> tuple[bool, str, Optional[str]]:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool = _pool
    fut = pool.submit(_math, completion, gold, MATH_TIMEOUT_S)
    try:
        return fut.result(timeout=4 * MATH_TIMEOUT_S + 30)  # the helper's start-up included
    except cf.TimeoutError:
        with _pool_lock:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            if _pool is pool:
                _pool = None
        return False, "math-verify timed out", None


def io_cases(tests: str) -> Optional[list[dict]]:
    """Standard-input tests (LiveCodeBench, OpenThoughts): a JSON list of {input, output}, or
    {"inputs": [...], "outputs": [...]}; None when `tests` is Python source instead."""
    import json
    s = tests.strip()
    if not s.startswith(("[", "{")):
        return None
    try:
        data = json.loads(s)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("inputs"), list):
        data = [{"input": i, "output": o} for i, o in zip(data["inputs"], data.get("outputs") or [])]
    if isinstance(data, list) and data and all(isinstance(c, dict) and "input" in c and "output" in c
                                               for c in data):
        return data
    return None


def _io_code(program: str, cases: list[dict], sandbox: Optional[SandboxConfig]) -> Verdict:
    """Run the program once per case on its stdin; stdout must match (whitespace-normalised)."""
    from rdistill.verify.sandbox import run_program
    for i, case in enumerate(cases):
        res = run_program(program, str(case["input"]), sandbox)
        if res.status != "ok":
            return Verdict(False, f"case {i}: {res.status}: {res.detail}".rstrip(": "), program, res.infra)
        if res.stdout.split() != str(case["output"]).split():
            return Verdict(False, f"tests failed: case {i}: wrong output", program)
    return Verdict(True, "passed", program)


def _code(completion: str, record: dict, sandbox: Optional[SandboxConfig], language: str) -> Verdict:
    from rdistill.verify.sandbox import run_program
    program = code_block(completion, language)
    if not program:
        return Verdict(False, "no program found")
    tests = _field(record, "tests") or ""
    if not tests.strip():
        return Verdict(False, "record has no tests", program)
    cases = io_cases(tests)
    if cases is not None:
        return _io_code(program, cases, sandbox)
    entry = _field(record, "entry_point")
    harness = f"{program}\n\n# ---- tests ----\n{tests}\n"
    if entry and "def check(" in tests and f"check({entry})" not in tests:
        harness += f"\ncheck({entry})\n"
    res = run_program(harness, None, sandbox)
    if res.status == "ok":
        return Verdict(True, "passed", program)
    if res.status == "error":
        failed = res.detail.startswith("AssertionError")
        return Verdict(False, ("tests failed: " if failed else "crashed: ") + res.detail, program)
    return Verdict(False, f"{res.status}: {res.detail}".rstrip(": "), program, res.infra)


def score(kind: str, completion: str, record: dict, sandbox: Optional[SandboxConfig] = None,
          language: str = "python") -> Verdict:
    """Judge one completion against its record with the verifier of `kind`."""
    completion = completion if isinstance(completion, str) else ""
    if kind == "math":
        if threading.current_thread() is threading.main_thread():
            ok, why, shown = _math(completion, _field(record, "gold"), MATH_TIMEOUT_S)
        else:
            ok, why, shown = _math_off_main_thread(completion, _field(record, "gold"))
        return Verdict(ok, why, shown)
    if kind == "code":
        return _code(completion, record, sandbox, language)
    if kind == "science":
        gold = gold_letter(_field(record, "gold"))
        if gold is None:
            return Verdict(False, f"gold {record.get('gold')!r} is not an option letter")
        got = choice_letter(completion)
        if got is None:
            return Verdict(False, "no answer letter found")
        return Verdict(got == gold, "correct" if got == gold else "wrong answer", got)
    raise ValueError(f"unknown verifier kind {kind!r}: use one of {', '.join(KINDS)}")


def score_batch(kind: str, rows: Iterable[dict], sandbox: Optional[SandboxConfig] = None,
                language: str = "python", threads: int = 1) -> list[Verdict]:
    """Verdicts of many rows ({completion, gold, tests, entry_point}); code rows may run
    `threads` sandboxes at once (each is its own process)."""
    rows = list(rows)
    if kind == "code" and threads > 1:
        with cf.ThreadPoolExecutor(threads) as ex:
            return list(ex.map(lambda r: score(kind, r.get("completion"), r, sandbox, language), rows))
    return [score(kind, r.get("completion"), r, sandbox, language) for r in rows]


def score_frame(df: Any, kind: Optional[str] = None, sandbox: Optional[SandboxConfig] = None,
                language: str = "python") -> Any:
    """A pandas batch with `correct`, `verdict` and `extracted` columns added; the kind comes from
    the argument or a `kind` column per row. Made for `Dataset.map_batches(batch_format="pandas")`."""
    out = df.copy()
    verdicts = []
    for r in df.to_dict("records"):
        verdicts.append(score(kind or r["kind"], r.get("completion"), r, sandbox, language))
    out["correct"] = [v.correct for v in verdicts]
    out["verdict"] = [v.reason for v in verdicts]
    out["extracted"] = [v.extracted for v in verdicts]
    return out


def score_dataset(ds: Any, kind: Optional[str] = None, sandbox: Optional[SandboxConfig] = None,
                  language: str = "python", batch_size: int = 16) -> Any:
    """`score_frame` over a Ray Dataset as parallel Ray tasks (lazy: consume or materialize it)."""
    from rdistill.topology import verify_task_options
    return ds.map_batches(score_frame, fn_kwargs=dict(kind=kind, sandbox=sandbox, language=language),
                          batch_format="pandas", batch_size=batch_size, **verify_task_options())
