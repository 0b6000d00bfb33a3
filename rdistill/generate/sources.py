"""Prompt records from a domain's sources: local JSONL/parquet files or Hugging Face datasets.

A record is `{id, domain, prompt, gold, tests, entry_point}` (strings or None), whatever the
source calls its columns (`SourceConfig.fields` maps ours to theirs). `load_records` reads,
filters, maps and limits a source; `screen_records` finds bad records (missing id or prompt,
empty prompt, duplicate id, prompt longer than the teacher's context) and either skips them
with counts or fails fast with one line saying which record and how to fix it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from rdistill.config import ConfigError, SourceConfig

FIELDS = ["id", "prompt", "gold", "tests", "entry_point"]
LETTERS = "ABCDEFGHIJ"


class BadRecordError(ConfigError):
    """A prompt record is unusable and `generate.on_bad_record=fail`."""


def _read_jsonl(path: Path) -> Iterable[dict]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield {"__bad__": f"malformed JSON on line {i + 1}: {e.msg}", "__where__": f"line {i + 1}"}
                continue
            if not isinstance(rec, dict):
                yield {"__bad__": f"line {i + 1} is not a JSON object", "__where__": f"line {i + 1}"}
                continue
            rec.setdefault("__where__", f"line {i + 1}")
            yield rec


def _raw_records(src: SourceConfig, resolve: Callable[[str], str]) -> Iterable[dict]:
    if src.path is not None:
        path = Path(resolve(src.path))
        if not path.exists():
            raise ConfigError(f"source path {src.path!r} ({path}) does not exist: check the path "
                              "(toy:<domain>/<split> needs the toy stage first)")
        if path.suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if path.suffix == ".parquet" or path.is_dir():
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        raise ConfigError(f"source path {src.path!r}: unknown format {path.suffix!r}; use .jsonl or .parquet")
    import datasets
    ds = datasets.load_dataset(src.hf_name, src.hf_subset, split=src.split)
    return iter(ds)


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


def load_records(src: SourceConfig, domain: str, resolve: Callable[[str], str] = str) -> list[dict]:
    """The source's records in rdistill's fields, filtered and limited. Records that cannot be
    read (malformed JSON lines) come back with a `bad` reason for `screen_records` to count."""
    name = {k: src.fields.get(k, k) for k in FIELDS}
    out: list[dict] = []
    for i, rec in enumerate(_raw_records(src, resolve)):
        if "__bad__" in rec:
            out.append({"id": None, "domain": domain, "prompt": None, "gold": None, "tests": None,
                        "entry_point": None, "bad": rec["__bad__"], "where": rec["__where__"]})
            continue
        if any(rec.get(k) != v for k, v in src.filter.items()):
            continue
        if src.limit is not None and len(out) >= src.limit:
            break
        # Sources without an id column (many HF sets) are numbered in file order.
        rid = rec.get(name["id"]) if name["id"] in rec else (i if "id" not in src.fields else None)
        rid = None if rid is None else str(rid)
        prompt, gold = rec.get(name["prompt"]), _text(rec.get(name["gold"]))
        if src.choices:
            prompt, gold = _with_choices(prompt, rec, src, rid or str(i))
        out.append({"id": rid, "domain": domain, "prompt": prompt, "gold": gold,
                    "tests": _text(rec.get(name["tests"])), "entry_point": _text(rec.get(name["entry_point"])),
                    "where": rec.get("__where__", f"record {i}")})
    return out


def chat_messages(prompt: str, system_prompt: Optional[str], suffix: str) -> list[dict]:
    """The chat sent for one prompt: optional system message, then the prompt with the domain's
    instruction suffix appended verbatim (configs put their own separator, e.g. a newline)."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": prompt + (suffix or "")}]


def screen_records(records: list[dict], on_bad: str, label: str,
                   count_tokens: Optional[Callable[[list[dict]], int]] = None,
                   max_model_len: Optional[int] = None, system_prompt: Optional[str] = None,
                   suffix: str = "") -> tuple[list[dict], Counter]:
    """Good records (with `messages` and `user_prompt` added) and the bad ones' counts by reason.
    With `on_bad='fail'` the first bad record raises BadRecordError naming it."""
    good: list[dict] = []
    bad: Counter = Counter()
    seen: set[str] = set()
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
