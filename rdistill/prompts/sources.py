"""Prompt records from a domain's sources: local JSONL/parquet files or Hugging Face datasets.

A record is `{id, domain, prompt, gold, tests, entry_point}` (strings or None), whatever the
source calls its columns (`SourceConfig.fields` maps ours to theirs), plus `traces` when the
source's existing teacher traces are asked for. `iter_records` streams a source: filters (values,
lists, numeric and date ranges), the LiveCodeBench adapter, exclusions, the limit; a filter or
field naming a column the source lacks, or a filter that keeps nothing, stops with one line.
`screen_records` finds bad records (missing id or prompt, empty prompt, duplicate id, prompt
longer than the teacher's context) and either skips them with counts or fails fast with one line
saying which record and how to fix it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rdistill.config import ConfigError, SourceConfig
from rdistill.prompts import lcb
from rdistill.prompts.filters import RowFilter
from rdistill.prompts.read import SourceReader
from rdistill.prompts.traces import trace_columns, traces_of

FIELDS = ["id", "prompt", "gold", "tests", "entry_point"]
LETTERS = "ABCDEFGHIJ"


class BadRecordError(ConfigError):
    """A prompt record is unusable and `generate.on_bad_record=fail`."""


def _text(value: Any) -> Optional[str]:
    """Strings stay, None stays, anything else (lists of tests, numbers) becomes JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _with_choices(prompt: Any, rec: dict, src: SourceConfig, rid: str) -> tuple[Any, Any]:
    """Shuffle the options (seeded by the record id) into lettered lines under the question;
    the gold answer becomes the correct option's letter (the first listed column)."""
    options = [rec.get(c) for c in src.choices]
    if prompt is None or any(o is None for o in options):
        return prompt, None
    order = list(range(len(options)))
    random.Random(f"choices:{rid}").shuffle(order)
    lines = [f"{LETTERS[k]}) {str(options[j]).strip()}" for k, j in enumerate(order)]
    return f"{prompt}\n\n" + "\n".join(lines), LETTERS[order.index(0)]


def _needed(src: SourceConfig, with_tests: bool, with_traces: bool) -> tuple[dict[str, str], set[str]]:
    """(columns a source must have, by what names them; the columns worth reading: large test and
    trace columns only when asked for)."""
    must = {c: f"filter.{c}" for c in src.filter}
    if src.adapter == "livecodebench":
        must.update({c: "the livecodebench adapter" for c in lcb.COLUMNS})
    else:
        must.update({c: f"fields.{k}" for k, c in src.fields.items()})
        must.update({c: "choices" for c in src.choices})
    traces = set(trace_columns(src.traces)) if src.traces is not None else set()
    must.update({c: "traces" for c in traces})
    tests = {"public_test_cases", "private_test_cases"} if src.adapter else {src.fields.get("tests", "tests")}
    want = set(must) | {src.fields.get(k, k) for k in FIELDS}
    return must, want - (set() if with_traces else traces) - (set() if with_tests else tests)


def _missing_error(key: str, reader: SourceReader, must: dict[str, str]) -> Optional[ConfigError]:
    miss = reader.missing(must)
    if not miss:
        return None
    c = miss[0]
    have = reader.columns if reader.columns is not None else sorted(reader.seen_columns)
    shown = ", ".join(have[:20]) + (", ..." if len(have) > 20 else "")
    fix = f"point {key} at a LiveCodeBench code_generation_lite copy" if " " in must[c] else f"fix {key}.{must[c]}"
    return ConfigError(f"{key}: column {c!r} (named by {must[c]}) is not in the source (its columns: "
                       f"{shown}): {fix}")


def iter_records(src: SourceConfig, domain: str, resolve: Callable[[str], str] = str, *, key: str = "",
                 tests_store: Optional[Path] = None, with_tests: bool = True, with_traces: bool = False,
                 exclude: Optional[Callable[[dict], bool]] = None) -> Iterator[dict]:
    """The source's records in rdistill's fields, filtered and limited, streamed. Records that
    cannot be read (malformed JSON lines) come with a `bad` reason for `screen_records` to count.
    `key` names the source in errors (e.g. domains.code.test); `tests_store` is where the
    livecodebench adapter keeps packed private tests; `with_traces` adds `traces` (and
    `skipped_incorrect`) from `src.traces`; `exclude(record)` drops records before the limit."""
    key = key or f"domain {domain} source {src.label()}"
    name = {k: src.fields.get(k, k) for k in FIELDS}
    reader = SourceReader(src, resolve)
    must, want = _needed(src, with_tests, with_traces)
    if reader.columns is not None and (err := _missing_error(key, reader, must)):
        raise err
    keep = RowFilter(src.filter)
    n_out = rows = 0
    for i, rec in enumerate(reader.rows(want)):
        rows += 1
        if "__bad__" in rec:
            yield {"id": None, "domain": domain, "prompt": None, "gold": None, "tests": None,
                   "entry_point": None, "bad": rec["__bad__"], "where": rec["__where__"]}
            continue
        if keep and not keep(rec):
            continue
        if src.adapter == "livecodebench":
            out = lcb.record(rec, tests_store, with_tests)
        else:
            # Sources without an id column (many HF sets) are numbered in file order.
            rid = rec.get(name["id"]) if name["id"] in rec else (i if "id" not in src.fields else None)
            rid = None if rid is None else str(rid)
            prompt, gold = rec.get(name["prompt"]), _text(rec.get(name["gold"]))
            if src.choices:
                prompt, gold = _with_choices(prompt, rec, src, rid or str(i))
            out = {"id": rid, "prompt": prompt, "gold": gold,
                   "tests": _text(rec.get(name["tests"])) if with_tests else None,
                   "entry_point": _text(rec.get(name["entry_point"]))}
        out = {"id": out["id"], "domain": domain, **{k: v for k, v in out.items() if k != "id"},
               "where": rec.get("__where__", f"record {i}")}
        if exclude is not None and exclude(out):
            continue
        if src.limit is not None and n_out >= src.limit:
            break
        if with_traces and src.traces is not None:
            out["traces"], out["skipped_incorrect"] = traces_of(rec, src.traces)
        n_out += 1
        yield out
    if reader.columns is None and rows and (err := _missing_error(key, reader, must)):
        raise err
    if keep and keep.seen_rows and not keep.kept:
        raise keep.nothing_kept(key, key)


def load_records(src: SourceConfig, domain: str, resolve: Callable[[str], str] = str, **kw: Any) -> list[dict]:
    """`iter_records` as a list (keyword options as there)."""
    return list(iter_records(src, domain, resolve, **kw))


def check_expected(src: SourceConfig, n: int, key: str) -> None:
    """Stop when a source yields a count far from its `expected_rows` (wrong subset, split or
    filter, or a changed dataset), before any work is spent on it."""
    want = src.expected_rows
    if want is None or abs(n - want) <= src.expected_tolerance * want:
        return
    raise ConfigError(f"{key} yields {n} records but expected_rows={want} (tolerance "
                      f"{src.expected_tolerance:.0%}): check its subset, split and filter, or set "
                      f"{key}.expected_rows={n} if the dataset changed")


def chat_messages(prompt: str, system_prompt: Optional[str], suffix: str) -> list[dict]:
    """The chat sent for one prompt: optional system message, then the prompt with the domain's
    instruction suffix appended verbatim (configs put their own separator, e.g. a newline)."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": prompt + (suffix or "")}]


def screen_records(records: list[dict], on_bad: str, label: str,
                   count_tokens: Optional[Callable[[list[dict]], int]] = None,
                   max_model_len: Optional[int] = None, system_prompt: Optional[str] = None,
                   suffix: str = "", seen: Optional[set] = None) -> tuple[list[dict], Counter]:
    """Good records (with `messages` and `user_prompt` added) and the bad ones' counts by reason.
    With `on_bad='fail'` the first bad record raises BadRecordError naming it. `seen` carries
    the ids met so far when a source is screened in chunks."""
    good: list[dict] = []
    bad: Counter = Counter()
    seen = set() if seen is None else seen
    for rec in records:
        why = rec.get("bad")
        if why is None:
            if rec["id"] is None or rec["id"] == "":
                why = "missing id"
            elif rec["prompt"] is None:
                why = "missing prompt"
            elif not isinstance(rec["prompt"], str):
                why = "prompt is not a string"
            elif not rec["prompt"].strip():
                why = "empty prompt"
            elif rec["id"] in seen:
                why = "duplicate id"
        msgs = None
        if why is None:
            msgs = chat_messages(rec["prompt"], system_prompt, suffix)
            if count_tokens is not None and max_model_len is not None:
                n = count_tokens(msgs)
                if n >= max_model_len:
                    why = f"prompt longer than the context ({n} >= {max_model_len} tokens)"
        if why is not None:
            reason = why.split(" (")[0].split(" on line")[0]
            if on_bad == "fail":
                raise BadRecordError(f"{label}: bad prompt record at {rec.get('where')} "
                                     f"(id={rec.get('id')!r}): {why}; fix the source or set "
                                     "generate.on_bad_record=skip to skip such records")
            bad[reason] += 1
            continue
        seen.add(rec["id"])
        r = {k: v for k, v in rec.items() if k not in ("where", "bad")}
        r["messages"] = msgs
        r["user_prompt"] = msgs[-1]["content"]
        good.append(r)
    return good, bad
