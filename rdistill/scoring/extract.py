"""Pulling the final answer out of a completion: the text after `</think>`, the last fenced Python
block, a gold option letter. Pure string work, shared by the filters and the evaluation (the
chosen option letter is rdistill.scoring.choice, the math answer rdistill.scoring.math_answer)."""

from __future__ import annotations

import re
from typing import Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)


def final_answer(completion: str) -> str:
    """The text after the last `</think>` (the whole completion when it has none)."""
    head, sep, tail = (completion or "").rpartition(THINK_CLOSE)
    return tail if sep else (completion or "")


def format_problem(completion: str) -> Optional[str]:
    """Why a completion breaks the `<think> reasoning </think> answer` format (None when it is fine)."""
    text = (completion or "").strip()
    if not text.startswith(THINK_OPEN):
        return "does not start with <think>"
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return "needs exactly one <think> and one </think>"
    reasoning, _, answer = text[len(THINK_OPEN):].partition(THINK_CLOSE)
    if not reasoning.strip():
        return "empty reasoning"
    if not answer.strip():
        return "no final answer after </think>"
    return None


def code_block(completion: str, language: str = "python") -> Optional[str]:
    """The program in the final answer: its last fenced block tagged with the language (else the
    last fenced block of any tag, else the final answer's text). None when nothing is left."""
    answer = final_answer(completion)
    blocks = _FENCE.findall(answer)
    tagged = [body for tag, body in blocks if tag.lower() in (language, language[:2])]
    if tagged:
        return tagged[-1]
    if blocks:
        return blocks[-1][1]
    text = answer.strip()
    return text or None


def gold_letter(gold: Optional[str]) -> Optional[str]:
    """A gold label like 'B', '(b)' or 'B) 42 m' as its letter."""
    m = re.match(r"\s*\(?([A-Ja-j])\b", gold or "")
    return m.group(1).upper() if m else None
