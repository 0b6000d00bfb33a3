"""Per-row filters, run as parallel Ray tasks over a domain's generated rows.

Each row gets the first filter it fails, in the funnel's order (cheap checks first, so that the
sandbox and math-verify only see rows that could still be kept):

    complete -> formatted -> within_budget -> decontaminated -> correct

plus, for rows still alive, its exact-duplicate key and MinHash signature, which the driver
uses for the dataset-level deduplication afterwards.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pyarrow as pa

from rdistill.config import SandboxConfig
from rdistill.verify.dedup import ContaminationIndex, exact_key, minhash
from rdistill.scoring.extract import format_problem
from rdistill.scoring.verifiers import score

INFRA = "unverified_infra"
# funnel step -> the drop reason of rows that fail it (in order)
# `checked`: the verifier could judge the answer; rows it could not (the sandbox failed to start,
# or a busy machine kept a program from running in time) are unverified, never counted as wrong.
FUNNEL = [("generated", None), ("complete", "incomplete"), ("formatted", "bad_format"),
          ("within_budget", "over_budget"), ("decontaminated", "contaminated"),
          ("checked", INFRA), ("correct", "incorrect"), ("deduplicated", "duplicate"),
          ("kept", "over_sample_cap")]
NEAR_DUPLICATE = "near_duplicate"  # counted at the deduplicated step, like duplicate
# What the checks hand back: fixed types, so that domains whose optional columns are all null
# (no tests in math) still union into one dataset.
CHECKED = pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("sample_idx", pa.int64()),
                     ("domain", pa.string()), ("messages_json", pa.string()), ("prompt", pa.string()),
                     ("completion", pa.string()), ("finish_reason", pa.string()),
                     ("completion_tokens", pa.int64()), ("drop_reason", pa.string()),
                     ("drop_detail", pa.string()), ("extracted", pa.string()), ("dup_key", pa.string()),
                     ("minhash", pa.list_(pa.int64()))])


def check_row(r: dict, kind: str, language: str, max_tokens: int, index: Optional[ContaminationIndex],
              sandbox: Optional[SandboxConfig], require_correct: bool = True
              ) -> tuple[Optional[str], str, Optional[str]]:
    """(drop reason or None, detail, extracted answer) of one generated row."""
    if r.get("finish_reason") != "stop":
        why = r.get("finish_reason") or "missing"
        return "incomplete", f"finish_reason={why}" + (f": {r['error']}" if r.get("error") else ""), None
    bad = format_problem(r.get("completion"))
    if bad:
        return "bad_format", bad, None
    n = r.get("completion_tokens")
    if n is None or n != n or n > max_tokens:  # n != n: a null count read back as NaN
        return "over_budget", f"{n} > {max_tokens} completion tokens", None
    if index is not None:
        hit = index.match(r.get("prompt") or "")
        if hit:
            return "contaminated", f"shares {hit!r} with an evaluation prompt", None
    if not require_correct:  # sources without checkable gold (domain require_correct=false)
        return None, "not verified (require_correct=false)", None
    v = score(kind, r["completion"], r, sandbox, language)
    if v.infra:
        return INFRA, v.reason, v.extracted
    if not v.correct:
        return "incorrect", v.reason, v.extracted
    return None, v.reason, v.extracted


def check_frame(df: Any, domain: str, kind: str, language: str, max_tokens: int,
                index: Optional[ContaminationIndex], sandbox: Optional[SandboxConfig],
                require_correct: bool = True) -> pa.Table:
    """A checked batch (CHECKED schema): the row's fields plus drop_reason, drop_detail,
    extracted, and for surviving rows the exact-duplicate key and MinHash signature."""
    out = []
    for r in df.to_dict("records"):
        reason, detail, ext = check_row(r, kind, language, max_tokens, index, sandbox, require_correct)
        alive = reason is None
        tokens = r.get("completion_tokens")
        out.append({"id": str(r["id"]), "prompt_id": str(r.get("prompt_id")), "sample_idx": int(r.get("sample_idx") or 0),
                    "domain": domain, "prompt": r.get("prompt"), "completion": r.get("completion"),
                    "messages_json": json.dumps([{"role": str(m["role"]), "content": str(m["content"])}
                                                 for m in list(r.get("messages") or [])], ensure_ascii=False),
                    "finish_reason": r.get("finish_reason"),
                    "completion_tokens": None if tokens is None or tokens != tokens else int(tokens),
                    "drop_reason": reason, "drop_detail": detail, "extracted": ext,
                    "dup_key": exact_key(r.get("prompt") or "", r["completion"]) if alive else None,
                    "minhash": minhash(f"{r.get('prompt') or ''}\n{r['completion']}") if alive else None})
    return pa.Table.from_pylist(out, schema=CHECKED)
