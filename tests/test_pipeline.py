"""The stage runner: manifests, skip-on-rerun, rerun-downstream-on-change, atomic stage folders."""

from __future__ import annotations

import json

import pytest

from rdistill.cli.compose import load
from rdistill import pipeline
from rdistill.rundir import RunDir

CALLS: list[str] = []


def _fake_stage(name):
    def run(ctx):
        CALLS.append(name)
        (ctx.out / f"{name}.txt").write_text(f"{name} {ctx.cfg.train.lr}")
        return {"rows": len(name)}
    return run


@pytest.fixture
def fake_stages(monkeypatch):
    CALLS.clear()
    monkeypatch.setattr(pipeline, "stage_fn", _fake_stage)
    return CALLS


STAGES = "stages=[toy,generate,verify,train,merge,evaluate,report]"


def test_rerun_skips_and_config_change_reruns_only_downstream(tmp_path, fake_stages):
    cfg = load([STAGES, f"run_dir={tmp_path}"])
    assert pipeline.run_pipeline(cfg) == {s: "ran" for s in cfg.stages}
    m = RunDir(tmp_path).manifest("verify")
    assert m["result"] == {"rows": 6} and m["inputs"].keys() == {"generate", "toy"}
    assert (tmp_path / "verify" / "verify.txt").exists()

    fake_stages.clear()
    assert set(pipeline.run_pipeline(cfg).values()) == {"skipped"}
    assert fake_stages == []

    cfg2 = load([STAGES, f"run_dir={tmp_path}", "train.lr=0.5"])
    done = pipeline.run_pipeline(cfg2)
    assert fake_stages == ["train", "merge", "evaluate", "report"]
    assert done["generate"] == "skipped" and done["train"] == "ran"
    # a branch-only override changes train, not generation (teacher tokens are not paid twice)
    fake_stages.clear()
    cfg3 = load([STAGES, f"run_dir={tmp_path}", "train.lr=0.5", "++domains.code.train_overrides.epochs=9"])
    pipeline.run_pipeline(cfg3)
    assert fake_stages == ["train", "merge", "evaluate", "report"]


def test_distill_sits_between_merge_and_evaluate(tmp_path, fake_stages):
    stages = "stages=[toy,generate,verify,train,merge,distill,evaluate,report]"
    pipeline.run_pipeline(load([stages, f"run_dir={tmp_path}"]))
    run = RunDir(tmp_path)
    assert set(run.manifest("distill")["inputs"]) == {"train", "merge", "toy"}
    assert "distill" in run.manifest("evaluate")["inputs"] and "distill" in run.manifest("report")["inputs"]
    fake_stages.clear()
    pipeline.run_pipeline(load([stages, f"run_dir={tmp_path}", "distill.lr=0.001"]))
    assert fake_stages == ["distill", "evaluate", "report"]
    # a teacher from outside the run: distill no longer waits for the branches
    cfg = load([stages, f"run_dir={tmp_path}", *(f"+distill.teachers.{d}=toy:teacher" for d in ("math", "code", "science"))])
    assert pipeline.SPECS["distill"].input_stages(cfg) == ["toy", "merge"]


def test_force_reruns_a_stage_and_its_dependents(tmp_path, fake_stages):
    cfg = load([STAGES, f"run_dir={tmp_path}"])
    pipeline.run_pipeline(cfg)
    fake_stages.clear()
    pipeline.run_pipeline(load([STAGES, f"run_dir={tmp_path}", "force=[merge]"]))
    assert fake_stages == ["merge", "evaluate", "report"]


def test_failed_stage_leaves_previous_output_and_no_manifest_for_partial_work(tmp_path, monkeypatch):
    cfg = load(["stages=[toy]", f"run_dir={tmp_path}"])
    monkeypatch.setattr(pipeline, "stage_fn", _fake_stage)
    pipeline.run_pipeline(cfg)
    before = json.loads((tmp_path / "toy" / "manifest.json").read_text())

    def boom(ctx):
        (ctx.out / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed")
    monkeypatch.setattr(pipeline, "stage_fn", lambda name: boom)
    with pytest.raises(RuntimeError):
        pipeline.run_stage(cfg, RunDir(tmp_path), "toy")
    assert json.loads((tmp_path / "toy" / "manifest.json").read_text()) == before
    assert not (tmp_path / "toy" / "half.bin").exists()
    assert not list(tmp_path.glob(".toy.tmp-*"))


def test_missing_upstream_output_is_one_clear_error(tmp_path, fake_stages):
    from rdistill.config import ConfigError
    cfg = load(["stages=[verify]", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="add generate to stages"):
        pipeline.run_pipeline(cfg)


def test_a_setting_a_stage_reads_is_in_its_cache_key():
    """Keys come from the stages' declarations: a new domain setting (or a new field of a section
    a stage reads) changes the key of every stage that reads it, with no list to update."""
    import dataclasses

    from rdistill.config import DomainConfig, TrainConfig
    cfg = load([])
    keys = {s: pipeline.config_key(cfg, s) for s in pipeline.SPECS}

    def changed(c):
        return {s for s in pipeline.SPECS if pipeline.config_key(c, s) != keys[s]}
    NewDomain = dataclasses.make_dataclass("NewDomain", [("new_setting", float, dataclasses.field(default=1.0))],
                                           bases=(DomainConfig,))
    c = dataclasses.replace(cfg, domains={n: NewDomain(**vars(d), new_setting=2.0) for n, d in cfg.domains.items()})
    readers = {s for s, spec in pipeline.SPECS.items() if spec.domains_ignored is not None}
    assert changed(c) == readers and {"generate", "verify", "train", "evaluate"} <= readers
    NewTrain = dataclasses.make_dataclass("NewTrain", [("new_knob", int, dataclasses.field(default=0))],
                                          bases=(TrainConfig,))
    # the train section is read by train and by distill (its update runs the same trainer)
    assert changed(dataclasses.replace(cfg, train=NewTrain(**vars(cfg.train), new_knob=3))) == {"train", "distill"}
    # what the issue found missing: evaluate reads dom.language
    code = dataclasses.replace(cfg.domains["code"], language="python3")
    assert "evaluate" in changed(dataclasses.replace(cfg, domains={**cfg.domains, "code": code}))
    # evaluation settings do not rerun training or generation
    assert changed(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_prompts=5))) == {"evaluate", "merge"}
