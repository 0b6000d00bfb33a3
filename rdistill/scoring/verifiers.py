"""The public scoring API, shared by the verify stage and the evaluation:

    score(kind, completion, record, sandbox=None) -> Verdict      (one answer)
    score_rows(df, sandbox=None) -> df                              (generated rows, pandas)
    score_dataset(ds, sandbox=None) -> ds                           (a Ray Dataset, in parallel)

`record` holds `gold` (math: the answer; science: the letter), `tests` (code: Python asserts run
after the program, a JSON list of {input, output} stdin/stdout cases, or a LiveCodeBench /
APPS call-based spec graded as lcb_runner does, see `rdistill.scoring.lcb`) and `entry_point`
(code: the function's name; HumanEval-style tests that define `check(candidate)` get
`check(<entry_point>)` appended). Importing this starts nothing.

math-verify bounds its parse/verify with SIGALRM, which only works on a process's main thread:
on the main thread (Ray tasks run there) it is used as is; on any other thread (threaded actors,
thread pools) each call goes to a helper process, where it is the main thread again, bounded by a
wall-clock wait that kills the helper when it hangs.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import threading
from dataclasses import dataclass
from typing import Any, Optional

from rdistill.config import SandboxConfig
from rdistill.scoring.choice import choice_letter
from rdistill.scoring.extract import code_block, gold_letter
from rdistill.scoring.math_answer import math_prediction

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
    p = parse(math_prediction(completion, str(gold)), parsing_timeout=timeout)
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
    from rdistill.scoring.sandbox import run_program
    for i, case in enumerate(cases):
        res = run_program(program, str(case["input"]), sandbox)
        if res.status != "ok":
            return Verdict(False, f"case {i}: {res.status}: {res.detail}".rstrip(": "), program, res.infra)
        if res.stdout.split() != str(case["output"]).split():
            return Verdict(False, f"tests failed: case {i}: wrong output", program)
    return Verdict(True, "passed", program)


def _lcb_code(program: str, spec: dict, sandbox: Optional[SandboxConfig]) -> Verdict:
    """LiveCodeBench (and APPS call-based) tests: every test in one sandboxed harness."""
    from rdistill.scoring.lcb import run_tests
    r = run_tests(program, spec, sandbox)
    if r["status"] == "passed":
        return Verdict(True, "passed", program)
    if r["status"] == "no_tests":
        return Verdict(False, "record has no tests", program)
    where = f"case {r['case']} of {r['total']}: " if r.get("case") is not None else ""
    what = "tests failed: " if r["status"] == "wrong_answer" else ""
    return Verdict(False, f"{what}{where}{r['status']}: {r['detail']}".rstrip(": "), program, r["infra"])


def _code(completion: str, record: dict, sandbox: Optional[SandboxConfig], language: str) -> Verdict:
    from rdistill.scoring.lcb import spec_of
    from rdistill.scoring.sandbox import run_program
    program = code_block(completion, language)
    if not program:
        return Verdict(False, "no program found")
    tests = _field(record, "tests") or ""
    if not tests.strip():
        return Verdict(False, "record has no tests", program)
    spec = spec_of(tests)
    if spec is not None:
        return _lcb_code(program, spec, sandbox)
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


def score_rows(df: Any, sandbox: Optional[SandboxConfig] = None) -> Any:
    """Add `correct` (bool), `reason` (str), `extracted` (the judged answer) and `infra` (no
    verdict: the sandbox or a busy machine failed, not the model) to a pandas batch of generated
    rows (columns kind, completion, finish_reason, error, gold, tests, entry_point, language).
    A sample is correct only when the model finished (not cut at max tokens, no generation
    error) and the verifier accepts its answer. Made for `Dataset.map_batches(batch_format="pandas")`."""
    correct, reasons, extracted, infra = [], [], [], []
    for row in df.to_dict("records"):
        # pandas turns None into NaN in mixed columns; the verifiers expect None
        row = {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in row.items()}
        v = None
        if row.get("error"):
            why = "generation error"
        elif row.get("finish_reason") != "stop":
            why = f"incomplete ({row.get('finish_reason')})"
        else:
            v = score(row["kind"], row["completion"], row, sandbox, row.get("language") or "python")
            why = v.reason
        correct.append(bool(v and v.correct))
        reasons.append(why)
        extracted.append(v.extracted if v else None)
        infra.append(bool(v and v.infra))
    df = df.copy()
    df["correct"], df["reason"], df["extracted"], df["infra"] = correct, reasons, extracted, infra
    return df


def score_dataset(ds: Any, sandbox: Optional[SandboxConfig] = None) -> Any:
    """`score_rows` over a Ray Dataset as parallel light Ray tasks (lazy, like the rest of the
    pipeline): code samples run in sandbox processes of their own, math and letters are cheap."""
    from rdistill.topology import LIGHT_CPU
    return ds.map_batches(score_rows, batch_format="pandas", batch_size=64, fn_kwargs={"sandbox": sandbox},
                          num_cpus=LIGHT_CPU)
