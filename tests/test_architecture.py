"""The import graph: stages depend on the shared packages, never on one another (data flows from
stage to stage through the run directory only)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "rdistill"
STAGES = {"toy", "generate", "verify", "train", "merge", "distill", "evaluate", "report", "serve"}
# The toy world is built by the project's own trainer (rdistill.toy.build -> rdistill.train.sft),
# and on-policy distillation's update runs in it too (rdistill.distill.stage -> rdistill.train.sft
# with the policy-gradient loss): the two stage-to-stage edges, by design.
ALLOWED = {("toy", "train"), ("distill", "train")}


def imports(path: Path) -> set[str]:
    """Every rdistill module a file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rdistill"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rdistill")}
    return out


def test_stages_import_shared_packages_not_each_other():
    edges = set()
    for stage in STAGES:
        for f in (PKG / stage).rglob("*.py"):
            for mod in imports(f):
                parts = mod.split(".")
                if len(parts) > 1 and parts[1] in STAGES and parts[1] != stage:
                    edges.add((stage, parts[1], f.name))
    assert {(a, b) for a, b, _ in edges} <= ALLOWED, sorted(edges)


def test_shared_packages_import_no_stage():
    shared = ["llm", "prompts", "scoring", "data", "config"]
    bad = []
    for pkg in shared:
        for f in (PKG / pkg).rglob("*.py"):
            bad += [(pkg, m, f.name) for m in imports(f) if m.split(".")[1:2] and m.split(".")[1] in STAGES]
    assert bad == []
