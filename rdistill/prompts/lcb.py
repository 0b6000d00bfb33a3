"""LiveCodeBench (code_generation_lite) rows as prompt records, as lcb_runner builds them.

The prompt is lcb_runner's generic template: the question, then either the starter code to
complete (LeetCode problems, graded call-based) or the stdin/stdout instruction. `tests` is the
spec `rdistill.scoring.lcb` grades: public cases as JSON, private cases still packed (decoded in
the verifier, right before use: decoded, a release's tests are gigabytes). With a `store` folder
the packed private tests go to a content-addressed file there and the record holds its path, so
that the many sample rows of one problem stay small.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

COLUMNS = ["question_id", "question_content", "starter_code", "public_test_cases",
           "private_test_cases", "metadata"]
FORMAT_STARTER = ("You will use the following starter code to write the solution to the problem and "
                  "enclose your code within delimiters.")
FORMAT_STDIN = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not "
                "directly test on the sample inputs). Enclose your code within delimiters as follows. "
                "Ensure that when the python program runs, it reads the inputs, runs the algorithm and "
                "writes output to STDOUT.")


def prompt(content: str, starter: Optional[str]) -> str:
    """lcb_runner's generic question template (prompts/code_generation.py)."""
    p = f"### Question:\n{content}\n\n"
    if starter:
        p += f"### Format: {FORMAT_STARTER}\n```python\n{starter}\n```\n\n"
    else:
        p += f"### Format: {FORMAT_STDIN}\n```python\n# YOUR CODE HERE\n```\n\n"
    return p + "### Answer: (use the provided format with backticks)"


def _json(v: Any, default: Any) -> Any:
    if v is None or v == "":
        return default
    return json.loads(v) if isinstance(v, str) else v


def _stored(packed: str, store: Path) -> str:
    """Write packed tests once under their content hash; returns the file's path."""
    path = store / f"{hashlib.sha256(packed.encode()).hexdigest()[:32]}.lcb"
    if not path.exists():
        store.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(packed, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)


def record(rec: dict, store: Optional[Path] = None, with_tests: bool = True) -> dict:
    """{id, prompt, gold, tests, entry_point} of one LiveCodeBench row. A functional problem
    (metadata func_name, starter code, functional tests) keeps its function name as entry_point."""
    meta = _json(rec.get("metadata"), {})
    starter = rec.get("starter_code") or ""
    fn = meta.get("func_name") if isinstance(meta, dict) else None
    tests = None
    if with_tests:
        spec: dict[str, Any] = {"format": "lcb", "fn_name": fn if starter else None,
                                "public": _json(rec.get("public_test_cases"), [])}
        private = rec.get("private_test_cases")
        if isinstance(private, str) and store is not None and private:
            spec["private_file"] = _stored(private, store)
        else:
            spec["private"] = private
        tests = json.dumps(spec, ensure_ascii=False)
    qid, content = rec.get("question_id"), rec.get("question_content")
    return {"id": None if qid is None else str(qid), "prompt": prompt(content, starter) if content else content,
            "gold": None, "tests": tests, "entry_point": fn if starter else None}
