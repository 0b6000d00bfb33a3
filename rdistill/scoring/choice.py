"""The chosen option letter of a multiple-choice answer, by one rule (README, "Verification"):

    Only the final answer counts (the text after the last `</think>`). Its answer statements name
    the letter: `Answer: X` (any case, with or without bold, `$`, `\\text{}`, `\\boxed{}`, a JSON
    `"answer"` field), `<answer>X</answer>`, `\\boxed{X}` (also `\\boxed{\\text{(X)}}`,
    `\\boxed{X: option text}`), `the answer/option/choice is X`, `option X is correct`,
    `I pick X`. When they name more than one letter the model did not commit: no letter. Only
    when there is no statement, a line that starts with a lone option label (`B`, `(B)`, `**B**`,
    `B) 2.3 eV`) names it, under the same agreement rule.

Letters A-J in either case; a lowercase letter counts only where it cannot be the article "a" or
the start of a word (`(d)`, `d)`, `d.`, `d` at the end of the line), so "a car" is never an answer.
The forms and the verdicts are pinned by tests/fixtures/endings/multiple_choice.yaml."""

from __future__ import annotations

import re
from typing import Iterator, Optional

from rdistill.scoring.extract import final_answer

# Markup around a letter that carries no meaning of its own: wrappers are unwrapped, math
# delimiters and bold/italic marks dropped (as simple-evals' normalize_response does).
_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mathit|operatorname)\s*\{([^{}]*)\}")
_MARKS = re.compile(r"\*\*|__|\\[()\[\]]|\$")
_BOXED = r"(?:\\boxed\s*\{\s*)?"
_OPTION_WORD = r"(?:(?i:option|choice)\s+)?"
# The letter: (X) in any case, or a bare X that is not the start of a longer word.
_LETTER = r"[*_]?(?:\((?P<p>[A-Ja-j])\)|(?P<b>[A-Ja-j])(?![A-Za-z0-9])(?!\s*[=^/]))"
_STATEMENTS = [
    # Answer: X / **Answer:** X / ANSWER: (d) / "answer": "C" / Final Answer: \boxed{B}
    re.compile(r"(?i:answer)[*_]?\"?[ \t]*[:：]\s*\"?\s*" + _BOXED + _OPTION_WORD + _LETTER),
    # <answer> B </answer> (DeepSeek-R1-Zero's template)
    re.compile(r"<answer>\s*" + _BOXED + _OPTION_WORD + _LETTER),
    # the (correct|final|best) answer/option/choice is (B) / would be C / is: \boxed{B}
    re.compile(r"(?i:answer|option|choice)\s+(?i:is|would\s+be|should\s+be|must\s+be|will\s+be)"
               r"\s*[:：]?\s*" + _BOXED + _OPTION_WORD + _LETTER),
    # option B is correct / (B) is the right answer / D) is correct
    re.compile(r"(?:(?<![A-Za-z])|(?i:option|choice)\s+)" + _LETTER + r"\)?\s+(?i:is|was)\s+(?i:the\s+)?"
               r"(?i:correct|right|best|answer)\b"),
    # I would pick B / I choose (C) / we select option D
    re.compile(r"\b(?:I|[Ww]e)(?:'d|'ll|\s+would|\s+will)?\s+(?i:pick|choose|select|go\s+with)\s+"
               + _OPTION_WORD + _LETTER),
    # \boxed{B} / \boxed{(B)} / \boxed{B: option text} / \boxed{(B) 905}
    re.compile(r"\\boxed\s*\{\s*(?:\((?P<p>[A-Ja-j])\)|(?P<b>[A-Ja-j])(?=\s*\}|[:.)]))"),
]
# A line that starts with a lone option label: "B", "(B)", "B) 2.3 eV", "b. 4".
_LABEL_LINE = re.compile(r"^[ \t>]*[*_]?(?:\((?P<p>[A-Ja-j])\)|(?P<b>[A-Ja-j])(?:[).:](?!\d)|[ \t]*$))", re.M)


def _normalise(text: str) -> str:
    for _ in range(3):  # nested wrappers: \boxed{\text{\textbf{B}}}
        text = _WRAPPERS.sub(r"\1", text)
    return _MARKS.sub("", text)


def _letters(pattern: re.Pattern, text: str) -> Iterator[str]:
    for m in pattern.finditer(text):
        if m.group("p"):
            yield m.group("p").upper()
            continue
        letter, after = m.group("b"), text[m.end("b"):m.end("b") + 40]
        if letter == "I" and re.match(r"'|\s+[a-z]", after):
            continue  # the pronoun: "Answer: I think ..."
        # lowercase only where it cannot be a word ("a car"): before ) . : or the end of the line
        if letter.isupper() or re.match(r"[).:,;!?\"'*}]|[ \t]*(?:\n|$)", after):
            yield letter.upper()


def choice_letter(completion: str) -> Optional[str]:
    """The option letter (A-J) the final answer commits to, by the module's rule; None when it
    names none, or names several different ones."""
    text = _normalise(final_answer(completion))
    named = {x for pat in _STATEMENTS for x in _letters(pat, text)}
    if not named:
        named = set(_letters(_LABEL_LINE, text))
    return named.pop() if len(named) == 1 else None
