"""What math-verify is handed for a math answer, by one rule (README, "Verification"):

    Only the final answer counts (the text after the last `</think>`). When it boxes its answer,
    math-verify gets every `\\boxed{}` of it and nothing else: a box repeated is one answer,
    different boxes form one set (`\\boxed{-2} and \\boxed{1}` is {-2, 1}), so a final answer that
    boxes two different values for one question matches neither. Without a box it gets the whole
    final answer, where math-verify reads `final answer is`, `Answer:`, then the last expression.

Two box forms are rewritten first, because math-verify misreads them: a percent sign inside the
box (`\\boxed{28\\%}` does not parse; `\\boxed{28}\\%` does) and an option label before the value
(`\\boxed{\\textbf{(C)}\\ 28}` parses as c*28): the label is kept when the gold is an option
letter, the value otherwise. The forms and verdicts are pinned by tests/fixtures/endings/math.yaml."""

from __future__ import annotations

import re
from typing import Optional

from rdistill.scoring.extract import final_answer

_BOX = re.compile(r"\\boxed\s*\{")
_PERCENT = re.compile(r"\s*\\?%\s*$")
# an AMC-style option label in front of the value: \textbf{(C)}\ 28, \text{(C) } 28, (C) 28
_LABEL = re.compile(r"^\s*(?:\\text(?:bf)?\s*\{\s*\(([A-E])\)\s*\}|\(([A-E])\))(?:\s|\\[ ,;!:]|~)*(.*)$", re.S)
_GOLD_LETTER = re.compile(r"^\s*\$?\s*(?:\\text(?:bf)?\s*\{)?\s*\(?([A-E])\)?\s*\}?\s*\$?\s*$")


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` in the text, in order (braces matched, so nested
    `\\frac{}{}` stay whole; an unclosed box is left out)."""
    out = []
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1].strip())
    return out


def _rewrite(box: str, gold_letter: Optional[str]) -> str:
    percent = bool(_PERCENT.search(box))
    box = _PERCENT.sub("", box) if percent else box
    label = _LABEL.match(box)
    if label and label.group(3).strip():
        box = (label.group(1) or label.group(2)) if gold_letter else label.group(3).strip()
    return f"\\boxed{{{box}}}" + ("\\%" if percent else "")


def math_prediction(completion: str, gold: Optional[str]) -> str:
    """The text math-verify parses for this completion, by the module's rule."""
    answer = final_answer(completion)
    boxes = list(dict.fromkeys(re.sub(r"\s+", " ", b) for b in boxed_contents(answer) if b))
    if not boxes:
        return answer
    gold_letter = _GOLD_LETTER.match(gold or "")
    return ", ".join(_rewrite(b, gold_letter.group(1) if gold_letter else None) for b in boxes)
