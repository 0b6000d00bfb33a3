"""Helpers shared by the generate tests: prompt files and configs for the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from rdistill.config import validated


def write_prompts(path: Path, n: int, domain: str = "math", extra: list | None = None) -> Path:
    """A toy-world style JSONL prompt file: {id, domain, prompt, gold, tests, entry_point}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"{domain}-{i}", "domain": domain, "prompt": f"What is {i} + {i}?",
                         "gold": str(2 * i), "tests": None, "entry_point": None}) for i in range(n)]
    lines += [x if isinstance(x, str) else json.dumps(x) for x in (extra or [])]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(run_dir: Path, domains: dict, teacher: dict, **generate) -> object:
    """A validated experiment config running only the generate stage."""
    return validated({
        "run_dir": str(run_dir), "stages": ["generate"], "student": {"base": "unused"},
        "ray": {"num_cpus": 8}, "teacher": teacher,
        "domains": {d: {"kind": "math", "train": {"path": str(p)}, "instruction_suffix": "\nBox it."}
                    for d, p in domains.items()},
        "generate": {"block_rows": 8, **generate},
    })


def read_output(run_dir: Path, domain: str) -> list[dict]:
    return pq.read_table(Path(run_dir) / "generate" / f"{domain}.parquet").to_pylist()
