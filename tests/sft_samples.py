"""Small hand-made SFT sets shared by the data and train tests."""

from __future__ import annotations

import json
import random
from pathlib import Path


def arithmetic_messages(a: int, b: int, system: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a careful calculator."}] if system else []
    return msgs + [{"role": "user", "content": f"What is {a}+{b}?"},
                   {"role": "assistant", "content": f"<think>{a}+{b}={a + b}</think> The answer is \\boxed{{{a + b}}}."}]


def write_sft(path: Path, n: int, seed: int = 0, long_every: int = 0) -> Path:
    """n arithmetic samples; every long_every-th one has a very long reasoning (for drop tests)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            msgs = arithmetic_messages(rng.randint(0, 9), rng.randint(0, 9), system=i % 3 == 0)
            if long_every and i % long_every == 0:
                msgs[-1]["content"] = "<think>" + "1+1=2 ; " * 200 + "</think> The answer is \\boxed{2}."
            f.write(json.dumps({"id": f"s{i}", "messages": msgs}) + "\n")
    return path
