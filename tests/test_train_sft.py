"""Ray Train + DeepSpeed SFT end to end on the CPU: training, kill-and-resume, HF/vLLM loading.

One uninterrupted 2-worker run is the reference; a second run with the same config is crashed
(the driver's fit fails), rerun (it continues from the checkpoint), killed again mid-run (Ray
Train restarts the workers from the last checkpoint), and must end on the same loss curve.
"""

from __future__ import annotations

import json
import time

import pytest

from rdistill.config import TrainConfig
from rdistill.toy.model import tiny_test_model
from rdistill.train.sft import train_sft
from sft_samples import write_sft

pytestmark = pytest.mark.slow

CFG = dict(num_workers=2, zero_stage=2, precision="fp32", max_steps=8, lr=3e-3, warmup_ratio=0.1,
           scheduler="cosine", micro_batch_size=2, max_len=256, checkpoint_every=2, max_failures=0,
           save_steps=[3])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    return {"dir": d, "base": str(tiny_test_model(d / "base")), "sft": str(write_sft(d / "sft.jsonl", 48))}


@pytest.fixture(scope="module")
def reference(ray_cluster, world):
    d = world["dir"]
    t = time.time()
    m = train_sft(world["base"], [world["sft"]], str(d / "ref"), TrainConfig(**CFG), name="ref",
                  storage_dir=str(d / "store"))
    m["test_wall_s"] = time.time() - t
    return m


def test_two_worker_deepspeed_run_trains_and_loss_falls(reference, world):
    m = reference
    print("reference run:", json.dumps({k: v for k, v in m.items() if k != "loss_curve"}))
    assert m["steps"] == 8 and m["workers"] == 2 and m["kept"] == 48
    assert m["final_loss"] < 0.8 * m["first_loss"]
    assert m["loss_curve"][-1][1] < min(l for _, l in m["loss_curve"][:3])
    assert m["tokens_per_s"] > 0 and 0 <= m["padding_share"] < 1
    lines = (world["dir"] / "ref" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))


def test_saved_model_loads_in_transformers_and_vllm_and_generates(reference, world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = world["dir"] / "ref"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(world["base"])
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]

    from vllm import LLM, SamplingParams
    llm = LLM(model=str(out), dtype="bfloat16", max_model_len=256, enforce_eager=True)
    try:
        res = llm.chat([{"role": "user", "content": "What is 2+3?"}], SamplingParams(max_tokens=8, temperature=0))
        assert len(res[0].outputs[0].token_ids) > 0
    finally:
        del llm


def test_crashed_run_continues_and_killed_worker_resumes_from_checkpoint(reference, world):
    d = world["dir"]
    kw = dict(name="crashy", storage_dir=str(d / "store"))
    # 1. A worker dies at step 3 with no failures allowed: fit fails, the step-2 checkpoint stays.
    with pytest.raises(Exception):
        train_sft(world["base"], [world["sft"]], str(d / "crashy"), TrainConfig(**CFG), **kw,
                  _fault=[{"rank": 1, "step": 3, "once_file": str(d / "fault1")}])
    assert not (d / "crashy").exists()
    # 2. Rerun: continues from step 2; a worker is killed at step 5 and Ray Train restarts the
    #    group from the step-4 checkpoint (FailureConfig).
    t = time.time()
    m = train_sft(world["base"], [world["sft"]], str(d / "crashy"), TrainConfig(**{**CFG, "max_failures": 1}),
                  **kw, _fault=[{"rank": 1, "step": 5, "once_file": str(d / "fault2")}])
    print("resumed run:", json.dumps({"resumed_from": m["resumed_from_steps"], "wall_s": time.time() - t,
                                      "reference_wall_s": reference["test_wall_s"],
                                      "final_loss": m["final_loss"], "ref_final_loss": reference["final_loss"]}))
    assert m["resumed_from_steps"] == [2, 4] and m["steps"] == 8
    # Same data order and optimizer state after each resume: the same loss curve as uninterrupted.
    assert [l for _, l in m["loss_curve"]] == pytest.approx([l for _, l in reference["loss_curve"]], rel=1e-4)


def test_snapshot_of_an_intermediate_step_survives_a_resume(reference, world):
    """save_steps=[3]: the model after step 3, written as it passed (before the crash at step 3
    in the resumed run, again after its resume), equal in both runs and unlike the final one."""
    import torch
    from transformers import AutoModelForCausalLM
    d = world["dir"]
    snaps = [AutoModelForCausalLM.from_pretrained(d / run / "snapshots" / "step-3") for run in ("ref", "crashy")]
    final = AutoModelForCausalLM.from_pretrained(d / "ref")
    for a, b, c in zip(snaps[0].state_dict().values(), snaps[1].state_dict().values(), final.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    assert any(not torch.allclose(a, c) for a, c in zip(snaps[0].state_dict().values(), final.state_dict().values()))
