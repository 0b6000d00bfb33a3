"""Config composition and validation: bad overrides fail in one line before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from compose import load
from rdistill.config import ConfigError, ExperimentConfig, branch_train_config, validated

from conftest import REPO


def test_default_composes_to_the_toy_world():
    cfg = load([])
    assert isinstance(cfg, ExperimentConfig)
    assert sorted(cfg.domains) == ["code", "math", "science"]
    assert cfg.teacher.model == "toy:teacher" and cfg.student.base == "toy:base"
    assert cfg.generate.sampling.temperature == 0.6 and cfg.generate.sampling.top_p == 0.95
    assert cfg.run_dir == "runs/toy"
    assert [s.merge_method for s in cfg.merge.candidates[0].steps] == ["arcee_fusion", "arcee_fusion"]


@pytest.mark.parametrize("override, fragment", [
    (["nosuchkey=1"], "unknown config key 'nosuchkey'"),
    (["train.nosuch=1"], "unknown config key 'train.nosuch'"),
    (["train.lr=-1"], "train.lr=-1.0 is invalid: must be > 0"),
    (["train.epochs=abc"], "train.epochs"),
    (["generate.sampling.n=-2"], "generate.sampling.n=-2 is invalid"),
    (["generate.sampling.top_p=1.5"], "must be <= 1"),
    (["merge.candidates.0.steps.0.merge_method=nope"], "allowed: arcee_fusion"),
    (["teacher.backend=grpc"], "allowed: vllm, openai"),
    (["teacher=nope"], "available teacher options"),
    (["stages=[train,generate]"], "pipeline order"),
    (["stages=[bake]"], "allowed: toy, generate"),
    (["teacher.backend=openai"], "teacher.base_url"),
    (["+domains.math.train_overrides.epochz=3"], "train_overrides"),
    (["+domains.math.train_overrides.lr=-3"], "domains.math.train_overrides.lr"),
    (["serve.min_replicas=3", "serve.max_replicas=2"], "serve.max_replicas"),
])
def test_bad_overrides_raise_one_clear_line(override, fragment):
    with pytest.raises(ConfigError) as e:
        load(override)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_branch_overrides_apply_per_domain():
    cfg = load(["+domains.code.train_overrides.epochs=15"])
    assert branch_train_config(cfg, "code").epochs == 15
    assert branch_train_config(cfg, "math").epochs == cfg.train.epochs


def test_validated_accepts_plain_dicts():
    cfg = validated({"domains": {"m": {"kind": "math", "train": {"path": "x.jsonl"}}}})
    assert cfg.domains["m"].train.path == "x.jsonl"
    with pytest.raises(ConfigError, match="domains.m.train"):
        validated({"domains": {"m": {"kind": "math"}}})


def test_cli_bad_override_exits_nonzero_with_one_line():
    p = subprocess.run([sys.executable, "jobs/run.py", "train.lr=-1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: train.lr=-1.0 is invalid: must be > 0"]


def test_cli_dry_run_prints_plan_without_starting_ray(tmp_path):
    p = subprocess.run([sys.executable, "jobs/run.py", "dry_run=true", f"run_dir={tmp_path}/r"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for stage in ("toy", "generate", "verify", "train", "merge", "evaluate", "report"):
        assert f"[{stage}]" in p.stdout
    assert "branch math: 2 worker(s)" in p.stdout
    assert not (tmp_path / "r").exists()  # nothing written
