"""How texts are cut into words for n-gram overlap: one rule, shared by the verify stage's
decontamination and the dev/test disjointness check, so both see the same overlaps."""

from __future__ import annotations

import re

_TOKENS = re.compile(r"\w+|[^\w\s]")


def words(text: str | None) -> list[str]:
    """Lower-cased words and punctuation marks of a text."""
    return _TOKENS.findall((text or "").lower())
