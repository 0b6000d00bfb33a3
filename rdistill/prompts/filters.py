"""Source filters: a column equals a value, is one of a list, or lies in a range (numbers or
ISO dates, e.g. LiveCodeBench's contest_date window), plus what a filter that keeps nothing
saw, so its error can say why in one line.

    {domain: code}                                       equals
    {domain: [biology, chemistry, physics]}              one of
    {contest_date: {ge: "2024-08-01", lt: "2025-02-01"}} range (ge, gt, le, lt)
    {difficulty: {in: [easy, medium]}}, {not_in: [...]}  set membership
"""

from __future__ import annotations

import datetime as dt
import operator
from typing import Any, Callable, Optional

from rdistill.config import ConfigError

_CMP = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def _as_date(v: Any) -> Optional[dt.datetime]:
    """A datetime from an ISO string, a date or a datetime (naive, in UTC); None otherwise."""
    if isinstance(v, dt.datetime):
        d = v
    elif isinstance(v, dt.date):
        d = dt.datetime(v.year, v.month, v.day)
    elif isinstance(v, str) and len(v) >= 10 and v[4:5] == "-":
        try:
            d = dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return d.astimezone(dt.timezone.utc).replace(tzinfo=None) if d.tzinfo else d


def _as_number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _bound(v: Any) -> tuple[Callable[[Any], Any], Any]:
    """How to read a column's values to compare them with bound `v`, and the bound so read."""
    if _as_number(v) is not None and not isinstance(v, str):
        return _as_number, _as_number(v)
    if _as_date(v) is not None:
        return _as_date, _as_date(v)
    if _as_number(v) is not None:
        return _as_number, _as_number(v)
    return (lambda x: x), v


def compile_rule(col: str, rule: Any) -> Callable[[Any], bool]:
    """A predicate on one column's value."""
    if isinstance(rule, (list, tuple)):
        allowed = list(rule)
        return lambda x: x in allowed
    if not isinstance(rule, dict):
        return lambda x: x == rule
    tests: list[Callable[[Any], bool]] = []
    for op, arg in rule.items():
        if op in _CMP:
            read, b = _bound(arg)
            cmp = _CMP[op]

            def t(x, read=read, b=b, cmp=cmp):
                v = read(x)
                try:
                    return v is not None and cmp(v, b)
                except TypeError:
                    return False
            tests.append(t)
        elif op == "in":
            tests.append(lambda x, a=list(arg): x in a)
        elif op == "not_in":
            tests.append(lambda x, a=list(arg): x not in a)
        else:
            raise ConfigError(f"filter.{col}: unknown operator {op!r}: use ge, gt, le, lt, in, not_in")
    return lambda x: all(t(x) for t in tests)


class RowFilter:
    """All of a source's filters; records a little of what it saw for the error message."""

    def __init__(self, filters: dict):
        self.filters = dict(filters)
        self.rules = {c: compile_rule(c, r) for c, r in self.filters.items()}
        self.seen_rows = self.kept = 0
        self.seen_values: dict[str, set] = {c: set() for c in self.rules}
        self.ranges: dict[str, list] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __call__(self, rec: dict) -> bool:
        self.seen_rows += 1
        for col, rule in self.rules.items():
            v = rec.get(col)
            self._note(col, v)
            if not rule(v):
                return False
        self.kept += 1
        return True

    def _note(self, col: str, v: Any) -> None:
        seen = self.seen_values[col]
        if len(seen) < 8 and isinstance(v, (str, int, float, bool)) and not (isinstance(v, str) and len(v) > 40):
            seen.add(v)
        key = _as_date(v) or _as_number(v)
        if key is not None:
            lo_hi = self.ranges.setdefault(col, [key, key, v, v])
            try:
                if key < lo_hi[0]:
                    lo_hi[0], lo_hi[2] = key, v
                if key > lo_hi[1]:
                    lo_hi[1], lo_hi[3] = key, v
            except TypeError:  # dates in one row, numbers in another
                pass

    def nothing_kept(self, label: str, key: str) -> ConfigError:
        """The one-line error for a filter that kept no row of a non-empty source."""
        parts = []
        for col in self.rules:
            if col in self.ranges and isinstance(self.filters[col], dict):
                lo, hi = self.ranges[col][2], self.ranges[col][3]
                parts.append(f"{col} runs from {lo} to {hi}")
            else:
                vals = sorted(map(str, self.seen_values[col]))
                parts.append(f"{col} has values like {', '.join(vals) or 'null'}")
        return ConfigError(f"{label}: filter {self.filters} keeps none of the {self.seen_rows} rows "
                           f"({'; '.join(parts)}): fix {key}.filter")
