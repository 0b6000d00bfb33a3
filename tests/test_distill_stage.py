"""The distill stage end to end on the toy's shipped models (vLLM sampling and scoring, Ray Train +
DeepSpeed updates): a model distilled from itself has advantage 0 everywhere and keeps its
weights; a stage that dies in its second round resumes after its first; a student missing a
domain's skill (the toy base) distilled from a teacher that has it (the toy teacher) gains on that
domain's dev split by more than 2 standard errors (with the default top-k KL loss)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rdistill import pipeline
from rdistill.cli.compose import load
from rdistill.rundir import RunDir
from rdistill.toy.build import ASSETS

pytestmark = pytest.mark.slow

BASE, TEACHER = str(ASSETS / "base"), str(ASSETS / "teacher")
SMALL = ["~domains.math", "~domains.code", "toy.n_train=64", "toy.n_dev=40", "toy.n_test=10",
         "train.num_workers=1", "train.micro_batch_size=4", "train.max_len=256", "eval.sampling.max_tokens=128",
         "distill.max_tokens=128", "distill.samples_per_prompt=2", "eval.engine.dtype=float32"]


def _run(tmp_path, *over):
    cfg = load([f"run_dir={tmp_path}", "stages=[toy,distill]", *SMALL, *over])
    run = RunDir(cfg.run_dir)
    if run.manifest("toy") is None:
        pipeline.run_stage(cfg, run, "toy")
    return cfg, run


def _weights(d) -> dict:
    from pathlib import Path
    return {k: v for f in sorted(Path(d).glob("*.safetensors")) for k, v in load_file(f).items()}


def test_self_distillation_changes_nothing_and_a_killed_stage_resumes(ray_cluster, tmp_path, monkeypatch):
    from rdistill.distill import stage as distill
    # the policy-gradient loss: its gradient is exactly 0 at advantage 0 (topk_kl's is not quite: its
    # teacher side is renormalised over the top k, which pulls mass into them)
    cfg, run = _run(tmp_path, f"distill.student={BASE}", f"+distill.teachers.science={BASE}", "distill.rounds=2",
                    "distill.prompts_per_domain=8", "distill.lr=1e-3", "distill.temperature=0.8",
                    "distill.loss=reverse_kl")
    real, calls = distill._update, []

    def dies_in_round_2(student, rows, out, c, storage, r):
        calls.append(r)
        if r == 1 and calls.count(1) == 1:
            raise RuntimeError("killed in round 2")
        return real(student, rows, out, c, storage, r)
    monkeypatch.setattr(distill, "_update", dies_in_round_2)
    with pytest.raises(RuntimeError, match="killed in round 2"):
        pipeline.run_stage(cfg, run, "distill")
    first = run.work_dir("distill") / "round-00" / "done.json"
    assert run.manifest("distill") is None and not (run.work_dir("distill") / "round-01" / "done.json").exists()
    # one round of a model distilled from itself: advantage 0 on every token, the weights unchanged
    rec = json.loads(first.read_text())
    assert rec["data"]["domains"]["science"]["tokens"] > 100
    assert rec["data"]["domains"]["science"]["max_abs_advantage"] == 0.0
    assert rec["update"]["steps"] >= 2
    before, after = _weights(BASE), _weights(rec["model"])
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-7, rtol=0)

    m = pipeline.run_stage(cfg, run, "distill")  # resumes: round 1 is not sampled or trained again
    assert calls == [0, 1, 1]
    assert m["result"]["rounds"] == 2
    rounds = json.loads((run.stage_dir("distill") / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0] == {k: v for k, v in rec.items() if k != "model"}  # the first attempt's round, as it was
    assert all(r["data"]["domains"]["science"]["max_abs_advantage"] == 0.0 for r in rounds)
    final = _weights(run.stage_dir("distill") / "model")
    for k in before:
        torch.testing.assert_close(final[k], before[k], atol=1e-7, rtol=0)


def test_distilling_a_missing_skill_from_a_teacher_that_has_it_raises_dev_score(ray_cluster, tmp_path):
    cfg, run = _run(tmp_path, f"distill.student={BASE}", f"+distill.teachers.science={TEACHER}", "distill.rounds=2",
                    "distill.prompts_per_domain=32", "distill.lr=2e-4", "distill.dev_prompts=40",
                    "distill.dev_samples=2")
    m = pipeline.run_stage(cfg, run, "distill")
    curve = m["result"]["dev_curve"]
    assert [c["round"] for c in curve] == [0, 1, 2]
    s0, s2 = curve[0]["dev"]["science"], curve[-1]["dev"]["science"]
    gain = s2["pass_at_1"] - s0["pass_at_1"]
    se = math.sqrt(s0["stderr"] ** 2 + s2["stderr"] ** 2)
    assert gain > 2 * se, curve
    kl = [r["data"]["domains"]["science"]["reverse_kl_per_token"] for r in
          json.loads((run.stage_dir("distill") / "rounds.json").read_text())["rounds"]]
    assert kl[0] > 0 and kl[1] < kl[0], kl  # the student moved toward the teacher
