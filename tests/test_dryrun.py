"""The dry run plans every model: the merge candidates, the search's budget and rungs, the
mixture baseline, and exactly the models the evaluate stage scores (its own list)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from rdistill.cli.compose import load
from rdistill.dryrun import format_plan
from rdistill.evaluate.targets import eval_targets

from conftest import REPO


def scored_by_evaluate(cfg) -> list[str]:
    """The evaluate stage's targets, every model reference resolved to the student base."""
    return [t.name for t in eval_targets(cfg, lambda ref: cfg.student.base)]


def listed(text: str) -> list[str]:
    (n, models), = re.findall(r"evaluate scores (\d+) models: (.*)", text)
    names = [re.sub(r" \(.*\)$", "", m) for m in models.split(", ")]
    assert int(n) == len(names)
    return names


def test_dry_run_with_the_merge_search_names_it_and_lists_what_evaluate_scores(tmp_path):
    p = subprocess.run([sys.executable, "jobs/run.py", "dry_run=true", "merge=search", f"run_dir={tmp_path}/r"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    cfg = load(["merge=search", f"run_dir={tmp_path}/r"])
    assert listed(out) == scored_by_evaluate(cfg) == [
        "base", "branch:math", "branch:code", "branch:science", "mixture", "merge:search", "teacher"]
    assert "merge search (merge:search): a budget of 32 candidates, 32 recipes drawn" in out
    # 80 dev prompts per domain (toy.n_dev), 32 candidates, 10 prompts first, eta 3:
    # 32 -> ceil(32/3) = 11 -> ceil(11/3) = 4, on 10, 30, then all 80 prompts
    assert "rungs (dev prompts per domain x candidates): 10x32, 30x11, 80x4" in out
    assert "mixture baseline (train, train.mixture_baseline)" in out
    assert "merge candidate" not in out  # merge=search has no fixed candidates
    assert "[evaluate] no manifest; asks for CPU=1\n      7 models on" in out  # the stage's own count agrees


@pytest.mark.parametrize("overrides, n", [
    ([], 8),  # base, 3 branches, mixture, merge:fusion, merge:search, teacher
    (["train.mixture_baseline=false", "eval.include_teacher=false"], 6),
    (["merge=toy_fusion"], 7),
])
def test_dry_run_lists_exactly_the_models_evaluate_scores(overrides, n, tmp_path):
    cfg = load(overrides + [f"run_dir={tmp_path}/r"])
    text = "\n".join(format_plan(cfg, "here", {"CPU": 8}))
    assert listed(text) == scored_by_evaluate(cfg) and len(listed(text)) == n
    for c in cfg.merge.candidates:  # every fixed candidate with its steps
        assert f"merge candidate {c.name}: " in text
    assert ("merge search (merge:search)" in text) == cfg.merge.search.enabled
    assert ("no mixture baseline" in text) == (not cfg.train.mixture_baseline)
    if len(cfg.merge.names()) > 1:  # several merges: scored on dev too, for the choice
        assert f"merge:{cfg.merge.names()[0]} (test+dev)" in text


def test_dry_run_says_when_a_stage_off_by_default_is_on(tmp_path):
    plan = lambda *o: "\n".join(format_plan(load([*o, f"run_dir={tmp_path}/r"]), "here", {"CPU": 8}))  # noqa: E731
    assert "off by default" not in plan()
    text = plan("stages=[merge,evaluate,report,serve]")
    assert "stages: merge, evaluate, report, serve (serve off by default, turned on here)" in text
    assert "[serve] runs (never cached)" in text
