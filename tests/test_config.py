"""Config composition and validation: bad overrides fail in one line before any work."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from rdistill.cli.compose import load
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
    cfg = load(["++domains.code.train_overrides.epochs=15", "++domains.code.train_overrides.lr=0.001"])
    assert branch_train_config(cfg, "code").epochs == 15 and branch_train_config(cfg, "code").lr == 0.001
    # the toy's passes: code and math converge in 2, the long science samples need train.epochs (3)
    assert branch_train_config(cfg, "math").epochs == 2
    assert branch_train_config(cfg, "science").epochs == cfg.train.epochs == 3


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


@pytest.mark.parametrize("overrides", [
    ["experiment=toy"],
    ["experiment=tinyr1_32b"],
    ["experiment=tinyr1_32b", "teacher=deepseek_r1_vllm"],
    ["experiment=r1_7b_1node"],
    ["experiment=r1_7b_1node", "teacher=openai_endpoint", "teacher.base_url=http://127.0.0.1:9/v1",
     "teacher.model=r1"],
])
def test_every_preset_composes_and_validates(overrides):
    cfg = load(overrides)
    assert cfg.domains and cfg.merge.candidates


def test_toy_merge_puts_a_search_of_every_task_vector_family_beside_the_fusion_chain():
    from rdistill.merge.search import candidate_space
    cfg = load([])
    assert [c.name for c in cfg.merge.candidates] == ["fusion"]
    assert cfg.merge.names() == ["fusion", "search"] and cfg.merge.search.enabled
    drawn = candidate_space(list(cfg.domains), cfg.merge.search)
    assert len(drawn) == 16
    # every method the search may draw is drawn, the new merges included, each from the branches
    assert {c.label.split()[0] for c in drawn} == set(cfg.merge.search.methods) >= \
        {"tsv_m", "iso_c", "iso_cts", "regmean", "regmean_plusplus", "task_arithmetic", "ties", "dare_ties"}
    for c in drawn:
        assert [m["model"] for m in c.steps[-1]["models"]] == ["branch:math", "branch:code", "branch:science"]
    with pytest.raises(ConfigError, match="objective=weighted needs a positive weight"):
        load(["merge.objective=weighted"])
    assert load(["merge.objective=weighted", "+merge.domain_weights.math=2"]).merge.domain_weights == {"math": 2.0}


def test_reference_preset_matches_the_recipe():
    cfg = load(["experiment=tinyr1_32b"])
    assert cfg.student.base == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    # as the paper did: the public R1 traces are imported; regenerating is one override away
    assert cfg.teacher.backend == "dataset"
    api = load(["experiment=tinyr1_32b", "teacher=deepseek_r1_api"]).teacher
    assert api.backend == "openai" and api.api_key_env == "DEEPSEEK_API_KEY"
    assert cfg.domains["math"].train.hf_name == "open-r1/OpenR1-Math-220k"
    got = {d: (branch_train_config(cfg, d).epochs, branch_train_config(cfg, d).scheduler,
               branch_train_config(cfg, d).grad_accum) for d in cfg.domains}
    assert got == {"math": (5, "constant_with_warmup", 3), "code": (15, "constant_with_warmup", 3),
                   "science": (5, "cosine", 1)}
    t = cfg.train
    assert (t.lr, t.warmup_ratio, t.adam_beta2, t.weight_decay, t.grad_clip, t.max_len, t.zero_stage,
            t.micro_batch_size, t.seed) == (1e-5, 0.1, 0.95, 0.01, 1.0, 16384, 3, 1, 42)
    steps = cfg.merge.candidates[0].steps
    assert [(s.base_model, s.models[0].model) for s in steps] == [
        ("branch:science", "branch:math"), ("branch:code", "merge:fusion/mid")]
    assert cfg.eval.sampling.temperature == 0.6 and cfg.domains["math"].eval_samples == 16
    assert cfg.train.chat_template == "r1_distill_keep_reasoning"  # R1-Distill's template drops <think>


def test_dry_run_of_the_32b_preset_lists_resources_and_what_does_not_fit(tmp_path):
    p = subprocess.run([sys.executable, "jobs/run.py", "experiment=tinyr1_32b", "dry_run=true",
                        f"run_dir={tmp_path}/r", "teacher=deepseek_r1_vllm"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "[generate] no manifest; asks for GPU=16" in out  # tp 8 x pp 2 per replica
    assert "branch math: 32 worker(s) x {'CPU': 8.0, 'GPU': 1.0}, ZeRO-3" in out
    assert "teacher tokens: at most" in out and "32.80B parameters" in out
    assert "does not fit this machine" in out and "train: GPU: needs 32, cluster has 0" in out
    assert "[evaluate] no manifest; asks for GPU=4" in out  # a 32B engine on 4 GPUs (KV-cache room)
    # per-GPU memory from the student's shape (off the hub here): 16k-token rows fit an 80 GB GPU,
    # and sequence parallelism splits the activations of a row over its ranks
    per_gpu = lambda text: [float(x) for x in re.findall(  # noqa: E731
        r"train math: per worker ~([\d.]+) GB .* ~([\d.]+) GB of activations .* ~([\d.]+) GB in all", text)[0]]
    state, act, total = per_gpu(out)
    assert 20 < total < 80 and act > 5, out
    p = subprocess.run([sys.executable, "jobs/run.py", "experiment=tinyr1_32b", "dry_run=true", f"run_dir={tmp_path}/r",
                        "train.sequence_parallel_size=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    state2, act2, total2 = per_gpu(p.stdout)
    assert state2 == state and act2 == pytest.approx(act / 2, rel=0.05) and total2 < total


def test_the_rdistill_command_documents_every_group():
    """The console script (pyproject [project.scripts]) as installed by jobs/setup.sh."""
    from pathlib import Path
    exe = str(Path(sys.executable).parent / "rdistill")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "rdistill run" in p.stdout and "rdistill merge" in p.stdout
    p = subprocess.run([exe, "run", "--help", "merge"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "merge.objective  (str, default 'mean'; one of mean, min, weighted)" in p.stdout
    assert "How domain scores combine when choosing a merge" in p.stdout  # the field's docstring
    p = subprocess.run([exe, "run", "--help", "domains.math"], capture_output=True, text=True, timeout=120)
    assert "domains.math.require_correct  (bool, default True)" in p.stdout
    p = subprocess.run([exe, "run", "--help", "train.lr"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: train.lr: lr is a value")
    p = subprocess.run([exe, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown command 'frobnicate'" in p.stderr
