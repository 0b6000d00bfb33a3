"""The verifiers on the endings reasoning models really write (tests/fixtures/endings/): every case
is judged as a person judged it, through the one scoring path that verify and evaluate share, and
the toy's own answer formats are fixture forms that score as before. Fast: no Ray."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

from rdistill.scoring.choice import choice_letter
from rdistill.scoring.math_answer import boxed_contents, math_prediction
from rdistill.scoring.verifiers import score, score_rows
from rdistill.toy.domains import math_problem, problems, science_problem, traces
from rdistill.verify.rows import check_row

ENDINGS = Path(__file__).parent / "fixtures" / "endings"
MC = yaml.safe_load((ENDINGS / "multiple_choice.yaml").read_text())
MATH = yaml.safe_load((ENDINGS / "math.yaml").read_text())


def completion(case: dict) -> str:
    """The whole completion as the generate stage writes it (imported traces too):
    `<think>\\nreasoning\\n</think>\\n\\nanswer`."""
    return case.get("completion") or f"<think>\n{case.get('think', 'reasoning')}\n</think>\n\n{case['ending']}"


def test_fixtures_are_big_enough_and_name_their_sources():
    assert len(MC) >= 40 and len(MATH) >= 20
    for cases in (MC, MATH):
        assert len({c["id"] for c in cases}) == len(cases)
        for c in cases:
            assert c["source"].strip() and c["form"].strip() and isinstance(c["correct"], bool), c["id"]
    for c in MC:  # a person's verdict is the letter they read against the gold
        assert c["correct"] == (c["letter"] == c["gold"]), c["id"]
    # the negative forms the issue names are all there
    ids = {c["id"] for c in MC}
    assert {"neg-letter-only-in-think", "neg-two-answers-disagree", "neg-no-letter"} <= ids
    assert sum(c["letter"] is None for c in MC) >= 5 and sum(not c["correct"] for c in MATH) >= 5


@pytest.mark.parametrize("case", MC, ids=[c["id"] for c in MC])
def test_multiple_choice_ending_read_as_a_person_reads_it(case):
    text = completion(case)
    assert choice_letter(text) == case["letter"]
    v = score("science", text, {"gold": case["gold"]})
    assert v.correct == case["correct"], v
    assert v.extracted == case["letter"]
    why = "correct" if case["correct"] else "wrong answer" if case["letter"] else "no answer letter found"
    assert v.reason == why


@pytest.mark.parametrize("case", MATH, ids=[c["id"] for c in MATH])
def test_math_ending_judged_as_a_person_judges_it(case):
    v = score("math", completion(case), {"gold": case["gold"]})
    assert v.correct == case["correct"], (v, math_prediction(completion(case), case["gold"]))


def test_verify_and_evaluate_give_every_fixture_case_the_same_verdict():
    """verify's row filter and evaluate's batch scorer both go through `score`: the fixture's
    verdicts come out of each unchanged."""
    import pandas as pd
    rows = [{"kind": kind, "completion": completion(c), "gold": c["gold"], "finish_reason": "stop",
             "error": None, "tests": None, "entry_point": None, "completion_tokens": 10, "prompt": "q"}
            for kind, cases in (("science", MC), ("math", MATH)) for c in cases]
    expected = [c["correct"] for c in MC + MATH]
    evaluated = score_rows(pd.DataFrame(rows))
    assert list(evaluated["correct"]) == expected
    verified = [check_row(r, r["kind"], "python", 100, None, None)[0] is None for r in rows]
    assert verified == expected


def _old_choice_letter(text: str):
    """The extractor before issue 29 (strongest pattern first, its last match), kept here as the
    reference the toy's science figures were measured with."""
    answer = text.rpartition("</think>")[2] if "</think>" in text else text
    for pat in [r"(?i:answer)\s*[:：]\s*[*_$\\{(\[\s]*(?:\\text(?:bf)?\{)?\s*\(?([A-J])\b",
                r"(?i:answer\s+(?:is|would be|should be))\s*[:：]?\s*[*_$\\{(\[\s]*"
                r"(?i:option\s+|choice\s+)?\(?([A-J])\b",
                r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\s*\}",
                r"(?i:option|choice)\s+\(?([A-J])\)?\s+(?i:is\s+(?:correct|right|the answer))",
                r"(?m)^\s*[*_]*\(?([A-J])[).:]?[*_]*\s*$", r"\(([A-J])\)"]:
        found = re.findall(pat, answer)
        if found:
            return found[-1].upper()
    return None


TOY_SCIENCE = re.compile(r"<think>[^\n]*</think> Answer: [A-D]")
TOY_MATH = re.compile(r"<think>[^\n]*</think> The answer is \\boxed\{\d+\}\.")


def test_toy_formats_are_fixture_forms():
    by_id = {c["id"]: c for c in MC}
    assert TOY_SCIENCE.fullmatch(by_id["toy-correct"]["completion"])
    assert TOY_MATH.fullmatch({c["id"]: c for c in MATH}["toy-correct"]["completion"])
    rng = random.Random(0)
    for _ in range(50):
        s, m = science_problem(rng), math_problem(rng)
        assert TOY_SCIENCE.fullmatch(s.completion) and TOY_SCIENCE.fullmatch(s.flawed)
        assert TOY_MATH.fullmatch(m.completion) and TOY_MATH.fullmatch(m.flawed)


def test_toy_science_completions_extract_the_same_letter_as_before():
    """The default toy run's science figures cannot move: on the toy's traces (correct and with a
    slip) and on every cut of them a model could stop at, the letter is the one the old extractor
    read, and it is the letter after the trace's `Answer: `."""
    rows = traces("science", 300, seed=0, slip_rate=0.5)
    texts = [r["messages"][1]["content"] for r in rows]
    slipped = 0
    for p, text in zip(problems("science", "train", 0, unique=False), texts):
        letter = text.rpartition("Answer: ")[2]
        assert choice_letter(text) == _old_choice_letter(text) == letter
        assert score("science", text, {"gold": p.gold}).correct == (letter == p.gold)
        slipped += letter != p.gold
        for cut in range(0, len(text), 7):
            assert choice_letter(text[:cut]) == _old_choice_letter(text[:cut]), text[:cut]
    assert 100 < slipped < 200  # both kinds of trace were checked


def test_toy_math_completions_score_as_their_sums():
    rng = random.Random(1)
    for _ in range(40):
        p = math_problem(rng)
        assert score("math", p.completion, {"gold": p.gold}).correct
        assert not score("math", p.flawed, {"gold": p.gold}).correct


def test_boxed_contents_match_braces():
    assert boxed_contents(r"x \boxed{\frac{1}{2}} and \boxed{3} then \boxed{4") == [r"\frac{1}{2}", "3"]
    assert math_prediction(r"<think>\boxed{9}</think> So \boxed{5}. Again: \boxed{ 5 }", "5") == r"\boxed{5}"
    assert math_prediction(r"<think>r</think> \boxed{28\%}", "28") == r"\boxed{28}\%"
    assert math_prediction(r"<think>r</think> $\boxed{\textbf{(C)}\ 28}$", "C") == r"\boxed{C}"
    assert math_prediction(r"<think>r</think> $\boxed{\textbf{(C)}\ 28}$", "28") == r"\boxed{28}"
    assert math_prediction("<think>r</think> Final Answer: 7", "7") == " Final Answer: 7"
