"""The toy world's three domains: seeded generators of problems with checkable answers and the
correct R1-style reasoning trace for each (what the teacher is pretrained on).

Each domain is small and templated so that a ~1-3M parameter model can genuinely learn it with
a scratchpad in a few thousand steps on a CPU:
- math: two-number word problems (sums of two 2-digit numbers), digit-by-digit scratchpad,
  answer in \\boxed{}.
- code: a Python function applying one or two arithmetic steps described in words, checked by
  hidden asserts.
- science: four-option multiple choice "which is the longest/heaviest/..." over quantities in
  mixed units, scratchpad converts each option to the small unit, then compares them two at
  a time carrying the winner, answer "Answer: X".

Splits are decided by a hash of the underlying problem (the numbers and operations, not the
names or wording), so a test problem's arithmetic is never seen in training in any wording.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

DOMAINS = ["math", "code", "science"]
SPLITS = ["train", "dev", "test"]
# Share of problem keys (in percent of the hash space) held out for test and dev.
TEST_PCT, DEV_PCT = 10, 5


@dataclass
class Problem:
    key: str
    """The underlying problem (numbers and operations); decides the split."""
    prompt: str
    completion: str
    """The correct R1-style answer: <think> steps </think> final answer."""
    gold: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    flawed: str | None = None
    """The same trace with one slip that carries through to a wrong answer (a digit sum off by
    one, a wrong constant, a comparison the wrong way round): what a partly skilled model writes."""


def _slip_rng(domain: str, key: str) -> random.Random:
    """Where the slip goes: drawn from the problem itself, so the problem stream is unchanged."""
    return random.Random(f"slip|{domain}|{key}")


def split_of(domain: str, key: str) -> str:
    h = int(hashlib.sha256(f"{domain}|{key}".encode()).hexdigest()[:8], 16) % 100
    return "test" if h < TEST_PCT else "dev" if h < TEST_PCT + DEV_PCT else "train"


# ---------------------------------------------------------------- math
NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo"]
ITEMS = ["apples", "pens", "books", "coins", "shells", "cards", "stamps", "marbles"]
MATH_TEMPLATES = [
    "{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?",
    "A box holds {a} {it} and another holds {b} {it}. How many {it} are there in total?",
    "{n} collected {a} {it} on Monday and {b} {it} on Tuesday. How many {it} in all?",
]


def add_scratchpad(a: int, b: int, slip: tuple[int, int] | None = None) -> tuple[str, int]:
    """Digit-by-digit addition, least significant digit first, with the carry written out; the
    answer the steps lead to. `slip` = (step, +1 or -1): that step's sum is written off by one
    and the carry follows it, as a person's slip would."""
    steps, carry, total = [], 0, 0
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    for i in range(n):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        if slip and slip[0] == i:
            s = s + slip[1] if s + slip[1] >= 0 else s + 1
        steps.append(f"{x}+{y}+{carry}={s}")
        total += (s % 10 if i < n - 1 else s) * 10 ** i
        carry = s // 10
    return " ; ".join(steps), total


def math_problem(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    t = rng.randrange(len(MATH_TEMPLATES))
    prompt = MATH_TEMPLATES[t].format(n=rng.choice(NAMES), a=a, b=b, it=rng.choice(ITEMS))
    pad, total = add_scratchpad(a, b)
    completion = f"<think>{pad}</think> The answer is \\boxed{{{total}}}."
    srng = _slip_rng("math", f"{a}+{b}")
    bad, wrong = add_scratchpad(a, b, (srng.randrange(2), srng.choice([-1, 1])))
    flawed = f"<think>{bad}</think> The answer is \\boxed{{{wrong}}}."
    return Problem(key=f"{a}+{b}", prompt=prompt, completion=completion, gold=str(a + b), flawed=flawed)


# ---------------------------------------------------------------- code
FUNC_NAMES = ["f", "g", "h", "calc", "step", "update", "scale", "shift"]
# (words with {t} the operand, python expression applied to e, the value it computes)
CODE_OPS: list[tuple[str, Callable[[str, int], str], Callable[[int, int], int]]] = [
    ("adds {k} to {t}", lambda e, k: f"{e} + {k}", lambda v, k: v + k),
    ("subtracts {k} from {t}", lambda e, k: f"{e} - {k}", lambda v, k: v - k),
    ("multiplies {t} by {k}", lambda e, k: f"({e}) * {k}" if " " in e else f"{e} * {k}",
     lambda v, k: v * k),
]


def code_problem(rng: random.Random) -> Problem:
    name = rng.choice(FUNC_NAMES)
    n_ops = rng.choice([1, 2])
    ops = [(rng.randrange(len(CODE_OPS)), rng.randint(2, 9)) for _ in range(n_ops)]
    words, expr, steps = [], "x", []
    for i, (o, k) in enumerate(ops):
        words.append(CODE_OPS[o][0].format(k=k, t="x" if i == 0 else "the result"))
        expr = CODE_OPS[o][1](expr, k)
        steps.append(expr)
    desc = words[0] if n_ops == 1 else f"{words[0]} and then {words[1]}"
    prompt = f"Write a Python function {name}(x) that {desc}."
    ref = f"def {name}(x):\n    return {expr}\n"
    completion = f"<think>{' ; '.join(steps)}</think>\n```python\n{ref}```"
    key = "|".join(f"{o}:{k}" for o, k in ops)
    srng = _slip_rng("code", key)  # one constant off by one, in the reasoning and the program
    j, d = srng.randrange(len(ops)), srng.choice([-1, 1])
    e2, s2 = "x", []
    for i, (o, k) in enumerate(ops):
        e2 = CODE_OPS[o][1](e2, k + d if i == j else k)  # k >= 2: k - 1 is still a positive constant
        s2.append(e2)
    flawed = f"<think>{' ; '.join(s2)}</think>\n```python\ndef {name}(x):\n    return {e2}\n```"
    tests = []
    for x in (0, 3, 7, 12):
        v = x
        for o, k in ops:
            v = CODE_OPS[o][2](v, k)
        tests.append(f"assert {name}({x}) == {v}")
    return Problem(key=key, prompt=prompt, completion=completion, gold=ref,
                   tests="\n".join(tests), entry_point=name, flawed=flawed)


# ---------------------------------------------------------------- science
# (big unit, small unit, factor, adjective for max, adjective for min)
QUANTITIES = [("km", "m", 1000, "longest", "shortest"),
              ("kg", "g", 1000, "heaviest", "lightest"),
              ("L", "mL", 1000, "largest volume", "smallest volume")]
LETTERS = "ABCD"


def science_problem(rng: random.Random) -> Problem:
    big, small, factor, most, least = rng.choice(QUANTITIES)
    want_max = rng.random() < 0.5
    values: list[int] = []  # in the small unit, all distinct
    shown: list[str] = []
    steps: list[str] = []
    while len(values) < 4:
        if rng.random() < 0.5:
            k = rng.randint(1, 9)
            v, text, step = k * factor, f"{k} {big}", f"{k} {big} = {k * factor} {small}"
        else:
            v = rng.randint(1, 99) * 100
            text, step = f"{v} {small}", f"{v} {small}"
        if v in values:
            continue
        values.append(v)
        shown.append(text)
        steps.append(f"{LETTERS[len(values) - 1]} {step}")
    # Why a running comparison: a 1M-parameter model cannot pick the max of four numbers in one
    # token (the first teacher stayed at chance), but it can compare two aligned 4-digit numbers
    # (zero-padded; digits are single tokens) and carry the winner to the next comparison.
    adj = most if want_max else least
    options = " ".join(f"{LETTERS[i]}) {s}" for i, s in enumerate(shown))
    prompt = f"Which is the {adj}? {options}"
    key = f"{big}|{int(want_max)}|" + ",".join(shown)

    def compare(flip: int | None) -> tuple[list[str], int]:
        """The running comparison; `flip`: that comparison is written the wrong way round and
        the wrong option carried on."""
        out, best = [], 0
        for i in range(1, 4):
            a, b = values[best], values[i]
            lt = (a < b) != (i == flip)
            out.append(f"{LETTERS[best]} {a:04d} {'<' if lt else '>'} {LETTERS[i]} {b:04d}")
            if lt == want_max:
                best = i
        return out, best
    cmp, best = compare(None)
    # the slip is in the comparison where the true answer enters (or, for A, its first one), so
    # it is knocked out and the answer comes out wrong
    bad, wrong = compare(max(best, 1))
    think = lambda c, b: f"<think>{' ; '.join(steps + c)} ; {adj}: {LETTERS[b]}</think> Answer: {LETTERS[b]}"  # noqa: E731
    return Problem(key=key, prompt=prompt, completion=think(cmp, best), gold=LETTERS[best],
                   flawed=think(bad, wrong))


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "math": math_problem, "code": code_problem, "science": science_problem}


def problems(domain: str, split: str, seed: int, unique: bool = True) -> Iterator[Problem]:
    """An endless, deterministic stream of problems of one domain and split (distinct prompts
    when `unique`; the teacher's pretraining stream repeats the small code space freely)."""
    if domain not in GENERATORS:
        raise ValueError(f"unknown toy domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    rng = random.Random(f"{seed}|{domain}|{split}")
    seen: set[str] = set()
    misses = 0
    while True:
        p = GENERATORS[domain](rng)
        if split_of(domain, p.key) != split or (unique and p.prompt in seen):
            misses += 1
            if misses > 20_000:
                raise ValueError(f"toy {domain}/{split}: ran out of distinct problems; lower n")
            continue
        seen.add(p.prompt)
        misses = 0
        yield p


def records(domain: str, split: str, n: int, seed: int) -> list[dict]:
    """`n` prompt records of one domain and split: {id, domain, prompt, gold, tests, entry_point}."""
    out = []
    for i, p in zip(range(n), problems(domain, split, seed)):
        out.append({"id": f"toy-{domain}-{split}-{i:05d}", "domain": domain, "prompt": p.prompt,
                    "gold": p.gold,
                    "tests": p.tests, "entry_point": p.entry_point})
    return out


def traces(domain: str, n: int, seed: int, slip_rate: float = 0.0) -> list[dict]:
    """`n` training-split SFT rows: {id, messages: [user prompt, assistant completion]}. The
    correct trace (the teacher's data), or with probability `slip_rate` the trace with one slip
    that makes the answer wrong (a partly skilled student's data)."""
    out = []
    pick = random.Random(f"{seed}|{domain}|slips")
    for i, p in zip(range(n), problems(domain, "train", seed, unique=False)):
        text = p.flawed if slip_rate and pick.random() < slip_rate else p.completion
        out.append({"id": f"trace-{domain}-{i:06d}",
                    "messages": [{"role": "user", "content": p.prompt},
                                 {"role": "assistant", "content": text}]})
    return out
