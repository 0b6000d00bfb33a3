"""The train stage through the stage runner: one branch per domain from the same base, run
concurrently, per-branch overrides (ZeRO-2 and ZeRO-3), HF outputs where refs.py looks for them,
metrics in the manifest."""

from __future__ import annotations

import json

import pytest

from rdistill import pipeline
from rdistill.config import to_dict, validated
from rdistill.refs import resolve_model
from rdistill.rundir import RunDir, write_json_atomic
from rdistill.toy.model import tiny_test_model
from sft_samples import write_sft

pytestmark = pytest.mark.slow


def test_train_stage_trains_each_branch_concurrently(ray_cluster, tmp_path):
    base = tiny_test_model(tmp_path / "base")
    run = RunDir(tmp_path / "run")
    verify = run.stage_dir("verify")
    verify.mkdir(parents=True)
    write_sft(verify / "math.jsonl", 24, seed=1)
    write_sft(verify / "science.jsonl", 16, seed=2, long_every=8)
    write_json_atomic(verify / "manifest.json", {"fingerprint": "verify-fp"})
    src = {"train": {"path": str(tmp_path / "prompts.jsonl")}}
    cfg = validated({
        "run_dir": str(run.root), "stages": ["train"], "student": {"base": str(base)},
        "teacher": {"model": str(base)},  # no toy:... reference, so the stage needs no toy stage
        "domains": {"math": {"kind": "math", **src},
                    "science": {"kind": "science", **src, "train_overrides": {"max_steps": 3, "zero_stage": 3}}},
        "train": {"num_workers": 2, "precision": "auto", "max_steps": 4, "lr": 3e-3, "micro_batch_size": 2,
                  "max_len": 128, "checkpoint_every": 2, "zero_stage": 2,
                  "concurrent": 2}})  # side by side even where the cores hold one (CI's 2 cores)
    manifest = pipeline.run_stage(cfg, run, "train")
    res = manifest["result"]
    assert res["branches"] == 2
    per = res["per_branch"]
    assert per["math"]["steps"] == 4 and per["science"]["steps"] == 3  # the override applies
    assert per["science"]["dropped_too_long"] == 2 and per["math"]["dropped_too_long"] == 0
    assert per["math"]["precision"] == "fp32"  # auto on the CPU
    for dom in ("math", "science"):
        path = resolve_model(f"branch:{dom}", run)
        assert (run.stage_dir("train") / dom / "config.json").exists() and path.endswith(f"train/{dom}")
        lines = [json.loads(x) for x in open(f"{path}/metrics.jsonl")]
        assert [r["step"] for r in lines] == list(range(1, per[dom]["steps"] + 1))
    # ZeRO-3 partitions the weights over the workers; the save gathers them into a full model.
    import torch
    from transformers import AutoModelForCausalLM
    sci = AutoModelForCausalLM.from_pretrained(resolve_model("branch:science", run))
    ref = AutoModelForCausalLM.from_pretrained(str(base))
    assert per["science"]["zero_stage"] == 3
    assert all(a.shape == b.shape for a, b in zip(sci.state_dict().values(), ref.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(sci.state_dict().values(), ref.state_dict().values()))
    # Both branches' workers were alive at the same time (the cluster has room for 2 x 2 CPUs).
    (a0, a1), (b0, b1) = per["math"]["workers_window"], per["science"]["workers_window"]
    assert max(a0, b0) < min(a1, b1)
    assert not run.work_dir("train").exists()  # checkpoints removed once the stage completed

    # One domain's SFT set changes (and the mixture baseline is asked for): exactly that branch
    # retrains, the other is reused as it was, and the mixture sees each domain's samples as often
    # as its branch did.
    weights = lambda: b"".join(p.read_bytes() for p in sorted((run.stage_dir("train") / "math").glob("*.safetensors")))  # noqa: E731
    math_bytes = weights()
    write_sft(verify / "science.jsonl", 16, seed=3, long_every=8)
    cfg2 = validated({**to_dict(cfg), "train": {**to_dict(cfg.train), "mixture_baseline": True}})
    res2 = pipeline.run_stage(cfg2, run, "train")["result"]
    assert res2["trained"] == ["mixture", "science"] and res2["reused"] == ["math"]
    assert math_bytes and weights() == math_bytes
    per2 = res2["per_branch"]
    assert per2["math"]["reused"] and per2["math"]["steps"] == 4 and "reused" not in per2["science"]
    mix = per2["mixture"]["tokens_per_domain"]
    for dom in ("math", "science"):
        own = per2[dom]["tokens_per_domain"][dom]
        assert abs(mix[dom] - own) <= 0.05 * own, (dom, mix, own)
        assert per2[dom]["worker_s"] > 0 and per2[dom]["compute_unit"] == "CPU-s"
