"""LiveCodeBench done as lcb_runner does it: the date window, public + packed private tests,
LeetCode problems in the prompt with their starter code and graded call-based, stdin problems run
as programs, per-test timeouts. Verdicts of reference solutions (right and wrong) are the ones the
official lcb_runner `run_test` gives on the same fixture problems (checked against it once, by
hand; its code is not vendored here), except where noted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tinyr1"))
import tinyr1_data as T  # noqa: E402

from rdistill.config import ConfigError, SourceConfig  # noqa: E402
from rdistill.prompts.sources import load_records  # noqa: E402
from rdistill.scoring import lcb  # noqa: E402
from rdistill.scoring.verifiers import score  # noqa: E402

WINDOW = {"contest_date": {"ge": "2024-08-01", "lt": "2025-02-01"}}

# (problem, what, program, verdict of lcb_runner's run_test)
SOLUTIONS = [
    ("abc365_a", "input()", "n = int(input())\nprint(sum(map(int, input().split())))\n", True),
    ("abc365_a", "sys.stdin.readline", "import sys\nn = int(sys.stdin.readline())\n"
     "print(sum(int(x) for x in sys.stdin.readline().split()))\n", True),
    ("abc365_a", "main guard", "def main():\n    n = int(input())\n    print(sum(map(int, input().split())))\n\n"
     "if __name__ == '__main__':\n    main()\n", True),
    ("abc365_a", "public sample hardcoded", "print(6)\n", False),  # the private tests catch it
    ("abc365_a", "off by one", "n = int(input())\nprint(sum(map(int, input().split())) + 1)\n", False),
    ("abc365_a", "runtime error", "n = int(input())\nprint(1 // 0)\n", False),
    ("abc365_a", "extra output line", "n = int(input())\nprint(sum(map(int, input().split())))\nprint('done')\n", False),
    ("3350", "sorted squares", "class Solution:\n    def sortedSquares(self, nums: List[int]) -> List[int]:\n"
     "        return sorted(x * x for x in nums)\n", True),
    ("3350", "tuple result", "class Solution:\n    def sortedSquares(self, nums: List[int]) -> List[int]:\n"
     "        return tuple(sorted(x * x for x in nums))\n", True),
    ("3350", "debug prints", "class Solution:\n    def sortedSquares(self, nums):\n        print('debug', nums)\n"
     "        return sorted(x * x for x in nums)\n", True),
    ("3350", "unsorted", "class Solution:\n    def sortedSquares(self, nums: List[int]) -> List[int]:\n"
     "        return [x * x for x in nums]\n", False),
    ("3350", "wrong method name", "class Solution:\n    def squares(self, nums):\n        return sorted(x * x for x in nums)\n", False),
    ("2050_B", "2.5 for 2.50 (Decimal compare)", "n = int(input())\na = list(map(int, input().split()))\n"
     "print(sum(a) / n)\n", True),
    ("2050_B", "a fraction string", "n = int(input())\na = list(map(int, input().split()))\nprint(f'{sum(a)}/{n}')\n", False),
    ("2050_B", "gcd without import (the official preamble)", "n = int(input())\na = list(map(int, input().split()))\n"
     "g = gcd(sum(a), n)\nprint(sum(a) / n)\n", True),
]


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    d = tmp_path_factory.mktemp("lcb")
    paths = T.write_all(d)
    src = SourceConfig(path=str(paths["lcb"]), adapter="livecodebench", filter=WINDOW)
    recs = load_records(src, "code", tests_store=d / "store")
    return {r["id"]: r for r in recs}, d


def _answer(program: str) -> str:
    return f"<think>\nreasoning\n</think>\n\n```python\n{program}```"


def test_window_prompts_and_packed_private_tests(problems):
    recs, d = problems
    assert sorted(recs) == ["2050_B", "3350", "abc365_a"]  # before and after the window: out
    fn = recs["3350"]
    assert fn["entry_point"] == "sortedSquares"
    assert "### Format: You will use the following starter code" in fn["prompt"]
    assert "def sortedSquares(self, nums: List[int]) -> List[int]:" in fn["prompt"]
    assert "Read the inputs from stdin" in recs["abc365_a"]["prompt"] and recs["abc365_a"]["entry_point"] is None
    spec = json.loads(fn["tests"])
    # private tests stay packed, in the run's store, until the verifier needs them
    assert spec["format"] == "lcb" and Path(spec["private_file"]).parent == d / "store"
    mode, cases = lcb.cases_of(spec)
    assert mode == "functional" and [c["output"] for c in cases] == ["[0, 1, 9, 16, 100]", "[4, 9, 9, 49, 121]", "[1]"]
    # a row with plain-JSON private tests (as some lite rows have) decodes too
    assert lcb.cases_of(json.loads(recs["2050_B"]["tests"]))[1][-1]["output"] == "1.25\n"
    assert lcb.unpack(T.pack([{"input": "1", "output": "2", "testtype": "stdin"}]))[0]["output"] == "2"


@pytest.mark.parametrize("qid,what,program,want", SOLUTIONS, ids=[f"{s[0]}-{s[1]}" for s in SOLUTIONS])
def test_verdicts_match_lcb_runner(problems, qid, what, program, want):
    v = score("code", _answer(program), problems[0][qid])
    assert v.correct is want, v.reason
    assert not v.infra


def test_open_0_reads_the_input_like_a_real_program(problems):
    # lcb_runner marks this wrong: its import preamble binds the real `open` before it mocks
    # stdin, so open(0) reads the grader's own empty stdin. Run as a program, it is right.
    prog = "d = open(0).read().split()\nprint(sum(map(int, d[1:])))\n"
    assert score("code", _answer(prog), problems[0]["abc365_a"]).correct


def test_reasons_name_the_failing_case(problems):
    recs = problems[0]
    v = score("code", _answer("print(6)\n"), recs["abc365_a"])
    assert v.reason.startswith("tests failed: case 1 of 3: wrong_answer") and "expected '100" in v.reason
    v = score("code", _answer("class Solution:\n    def squares(self, n):\n        return n\n"), recs["3350"])
    assert "compile_error" in v.reason and "sortedSquares" in v.reason
    v = score("code", _answer("def f(:\n"), recs["abc365_a"])
    assert "SyntaxError" in v.reason and "line 1" in v.reason  # the preamble does not shift lines


def test_per_test_timeout(problems, monkeypatch):
    monkeypatch.setattr(lcb, "TEST_TIMEOUT_S", 1)
    prog = "n = int(input())\nif n == 4:\n    while True:\n        pass\nprint(sum(map(int, input().split())))\n"
    v = score("code", _answer(prog), problems[0]["abc365_a"])
    assert not v.correct and "case 2 of 3: timeout" in v.reason


def test_missing_private_tests_file_is_infrastructure(problems, tmp_path):
    rec = dict(problems[0]["3350"])
    spec = json.loads(rec["tests"])
    spec["private_file"] = str(tmp_path / "gone.lcb")
    rec["tests"] = json.dumps(spec)
    v = score("code", _answer(SOLUTIONS[7][2]), rec)
    assert v.infra and not v.correct and "private tests unreadable" in v.reason


def test_apps_call_based_tests(tmp_path):
    rec = {"tests": json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]})}
    assert score("code", _answer("def add(a, b):\n    return a + b\n"), rec).correct
    assert not score("code", _answer("def add(a, b):\n    return a - b\n"), rec).correct


def test_lcb_columns_are_checked(tmp_path):
    paths = T.write_all(tmp_path)
    with pytest.raises(ConfigError, match=r"column 'question_id' .* point domains.code.test at a LiveCodeBench"):
        load_records(SourceConfig(path=str(paths["aime24"]), adapter="livecodebench"), "code", key="domains.code.test")
