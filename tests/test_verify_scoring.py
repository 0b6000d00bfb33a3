"""Each verifier against known right and wrong answers, through the public scoring API."""

from __future__ import annotations

import threading

import pytest

from rdistill.config import SandboxConfig
from rdistill.scoring.choice import choice_letter
from rdistill.scoring.extract import code_block, format_problem, gold_letter
from rdistill.scoring.verifiers import Verdict, score, score_rows

THINK = "<think>working it out</think> "


@pytest.mark.parametrize("gold,answer", [
    ("1/2", r"\boxed{0.5}"), ("0.5", r"\boxed{\frac{1}{2}}"), (r"\frac{1}{2}", r"\boxed{1/2}"),
    ("85", r"The answer is \boxed{85}."), ("85", r"So we get $85$."), (r"\sqrt{2}/2", r"\boxed{\frac{\sqrt{2}}{2}}"),
])
def test_math_equivalent_forms_are_correct(gold, answer):
    v = score("math", THINK + answer, {"gold": gold})
    assert v.correct, v


@pytest.mark.parametrize("gold,answer,reason", [
    ("85", r"The answer is \boxed{86}.", "wrong answer"), ("1/2", r"\boxed{0.51}", "wrong answer"),
    ("85", "I am not sure.", "no answer found"),
])
def test_math_wrong_answers(gold, answer, reason):
    v = score("math", THINK + answer, {"gold": gold})
    assert not v.correct and v.reason == reason


def test_math_judges_the_final_answer_not_the_reasoning():
    # a boxed value inside <think> is a draft; only the final answer counts
    assert not score("math", r"<think>maybe \boxed{85}</think> The answer is \boxed{84}.", {"gold": "85"}).correct


def test_math_off_the_main_thread():
    # math-verify's SIGALRM timeouts fail off the main thread; scoring must still work there
    out = []
    t = threading.Thread(target=lambda: out.append(score("math", THINK + r"\boxed{0.25}", {"gold": "1/4"})))
    t.start()
    t.join(120)
    assert out and out[0].correct


CODE = THINK + "\n```python\ndef f(x):\n    return {body}\n```"
TESTS = {"tests": "assert f(0) == 2\nassert f(3) == 11", "entry_point": "f"}
SBX = SandboxConfig(timeout_s=8.0, cpu_s=1)


@pytest.mark.parametrize("body,correct,reason", [
    ("x * 3 + 2", True, "passed"),
    ("x * 3", False, "tests failed: AssertionError"),
    ("1 / 0", False, "crashed: ZeroDivisionError: division by zero"),
    ("sum(iter(int, 1))", False, "timeout"),
])
def test_code_pass_fail_crash_timeout(body, correct, reason):
    v = score("code", CODE.format(body=body), TESTS, SBX)
    assert v.correct == correct and v.reason.startswith(reason), v
    assert v.extracted.startswith("def f(x):")


def test_code_humaneval_style_check_and_missing_program():
    rec = {"tests": "def check(c):\n    assert c(1) == 5\n", "entry_point": "f"}
    assert score("code", CODE.format(body="x * 3 + 2"), rec, SBX).correct
    assert not score("code", CODE.format(body="x"), rec, SBX).correct
    assert score("code", "<think>hmm</think>", TESTS, SBX).reason == "no program found"


def test_code_block_extraction():
    two = THINK + "```python\nprint(1)\n```\nthen\n```python\ndef f(x):\n    return x\n```\ndone"
    assert code_block(two) == "def f(x):\n    return x\n"  # the last python block
    assert code_block(THINK + "```\nx = 1\n```") == "x = 1\n"  # untagged fence
    assert code_block(THINK + "def f(x): return x") == "def f(x): return x"  # no fence: text after </think>


@pytest.mark.parametrize("text,letter", [
    ("Answer: B", "B"), ("**Answer:** C", "C"), ("answer: (D)", "D"), ("The answer is (A).", "A"),
    ("the correct answer is C because", "C"), (r"So \boxed{B}", "B"), ("Thus:\n\nD\n", "D"),
    ("I pick (C) over (A). Answer: A", None),  # two answer statements that disagree
    ("Option B is correct.", "B"), ("no idea", None), ("Answer: b", "B"),
])  # the real-style endings are in tests/fixtures/endings (tests/test_answer_endings.py)
def test_science_letters_in_several_styles(text, letter):
    assert choice_letter(THINK + text) == letter


def test_science_verdicts():
    assert score("science", THINK + "Answer: B", {"gold": "B"}).correct
    assert score("science", THINK + "Answer: C", {"gold": "(b)"}).reason == "wrong answer"
    assert score("science", THINK + "hmm", {"gold": "B"}).reason == "no answer letter found"
    assert gold_letter("B) 4 km") == "B"


def test_format_checks():
    assert format_problem("<think>a</think> b") is None
    assert format_problem("a</think> b") == "does not start with <think>"
    assert format_problem("<think>a</think>  ") == "no final answer after </think>"
    assert format_problem("<think>a</think> b </think>") == "needs exactly one <think> and one </think>"
    assert format_problem("<think> </think> b") == "empty reasoning"


def test_rows_form():
    import pandas as pd
    base = {"finish_reason": "stop", "error": None, "tests": None, "entry_point": None}
    rows = [dict(base, kind="math", completion=THINK + r"\boxed{3}", gold="3"),
            dict(base, kind="math", completion=THINK + r"\boxed{4}", gold="3"),
            *(dict(base, kind="code", completion=CODE.format(body=b), gold=None, **TESTS) for b in ("x * 3 + 2", "x")),
            dict(base, kind="science", completion=THINK + "Answer: A", gold="A")]
    out = score_rows(pd.DataFrame(rows), SBX)
    assert list(out["correct"]) == [True, False, True, False, True]
    assert list(out["extracted"])[:2] == ["3", "4"] and list(out["extracted"])[-1] == "A"
    assert not out["infra"].any()
    with pytest.raises(ValueError, match="unknown verifier kind"):
        score("poetry", "x", {})
    assert isinstance(score("science", "Answer: A", {"gold": "A"}), Verdict)


def test_require_correct_false_keeps_unverifiable_but_still_filters_format():
    from rdistill.verify.rows import check_row
    row = {"finish_reason": "stop", "completion": "<think>ideas</think> The membrane is permeable.",
           "completion_tokens": 10, "prompt": "Why?", "gold": "long free-form solution"}
    assert check_row(row, "science", "python", 100, None, None)[0] == "incorrect"
    reason, detail, _ = check_row(row, "science", "python", 100, None, None, require_correct=False)
    assert reason is None and "not verified" in detail
    cut = dict(row, finish_reason="length")
    assert check_row(cut, "science", "python", 100, None, None, require_correct=False)[0] == "incomplete"


def test_code_stdin_stdout_cases():
    import json
    prog = "```python\nn = int(input())\nprint(n * 2)\n```"
    cases = json.dumps([{"input": "3\n", "output": "6\n"}, {"input": "10\n", "output": "20"}])
    assert score("code", THINK + prog, {"tests": cases}).correct
    wrong = "```python\nn = int(input())\nprint(n + 2)\n```"
    v = score("code", THINK + wrong, {"tests": cases})
    assert not v.correct and "case 0: wrong output" in v.reason  # 3 + 2 = 5, not 6
    v = score("code", THINK + wrong, {"tests": json.dumps({"inputs": ["4\n"], "outputs": ["6"]})})
    assert v.correct  # 4 + 2 == 6
