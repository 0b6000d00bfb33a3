"""Whole merges through Ray tasks, compared with mergekit (the oracle) on small random models:
every method, a fusion chain as in the reference recipe, the merge stage, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rdistill.merge import merge

from test_merge_fixtures import make_variants

REPO = Path(__file__).resolve().parent.parent
DIFFS: dict[str, dict] = {}  # method -> largest differences, printed at the end (report figures)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_variants(tmp_path_factory.mktemp("parity_models"), vocab_cut=4)


def _m(models, name, **params):
    return {"model": str(models[name]), "parameters": params}


def plans(m) -> dict:
    b = str(m["base"])
    three = [_m(m, "v0", weight=1.0, density=0.5), _m(m, "v1", weight=0.5, density=0.3),
             _m(m, "v2", weight=0.7, density=0.7)]
    return {
        "linear": dict(merge_method="linear", models=[_m(m, "v0", weight=1.0), _m(m, "v1", weight=0.5),
                                                      _m(m, "v2", weight=0.25)], dtype="bfloat16"),
        "task_arithmetic": dict(merge_method="task_arithmetic", base_model=b, models=[
            _m(m, "v0", weight=0.7), _m(m, "v1", weight=0.3)], parameters={"lambda": 0.8}, dtype="bfloat16"),
        "ties_fp32": dict(merge_method="ties", base_model=b, models=three, dtype="float32"),
        "ties": dict(merge_method="ties", base_model=b, models=three, dtype="bfloat16"),
        "dare_ties": dict(merge_method="dare_ties", base_model=b, models=three, dtype="bfloat16"),
        "dare_linear": dict(merge_method="dare_linear", base_model=b, models=three, dtype="bfloat16"),
        "slerp": dict(merge_method="slerp", base_model=b, models=[_m(m, "v0")],
                      parameters={"t": [0.0, 0.3, 1.0]}, dtype="bfloat16"),
        "model_stock": dict(merge_method="model_stock", base_model=b, models=[_m(m, "v0"), _m(m, "v1"),
                                                                            _m(m, "v2")], dtype="bfloat16"),
        "arcee_fusion": dict(merge_method="arcee_fusion", base_model=b, models=[_m(m, "v0")], dtype="bfloat16"),
    }


def mergekit(plan: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a merge task: bf16 reductions then round the same way
    try:
        run_merge(MergeConfiguration.model_validate(plan), str(out),
                  MergeOptions(quiet=True, write_model_card=False, random_seed=0))
    finally:
        torch.set_num_threads(threads)
    return out


def bf16_ulps(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """|ours - theirs| in units of bf16's spacing at theirs (1 = one bf16 rounding)."""
    y = theirs.double()
    ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(2.0 ** -126))) - 7)
    return (ours.double() - y).abs() / ulp


def compare(ours_dir: Path, theirs_dir: Path, base_dir: Path) -> dict:
    a, b = load_file(ours_dir / "model.safetensors"), load_file(theirs_dir / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    assert a.keys() == b.keys()
    n = sum(v.numel() for v in a.values())
    out = {"max_abs": 0.0, "max_bf16_ulps": 0.0, "frac_differing": 0.0, "kept_ours": 0.0, "kept_theirs": 0.0,
           "delta_norm_ours": 0.0, "delta_norm_theirs": 0.0}
    for k in a:
        assert a[k].shape == b[k].shape, k
        x, y = a[k].double(), b[k].double()
        out["max_abs"] = max(out["max_abs"], float((x - y).abs().max()))
        out["max_bf16_ulps"] = max(out["max_bf16_ulps"], float(bf16_ulps(x, y).max()))
        out["frac_differing"] += float((x != y).sum()) / n
        bb = base[k].to(a[k].dtype).double()
        out["kept_ours"] += float((x != bb).sum()) / n
        out["kept_theirs"] += float((y != bb).sum()) / n
        out["delta_norm_ours"] += float(((x - bb) ** 2).sum())
        out["delta_norm_theirs"] += float(((y - bb) ** 2).sum())
    out["delta_norm_ours"] **= 0.5
    out["delta_norm_theirs"] **= 0.5
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties_fp32", "ties", "dare_ties",
                                    "dare_linear", "slerp", "model_stock", "arcee_fusion"])
def test_parity_with_mergekit(ray_cluster, models, tmp_path, method):
    plan = plans(models)[method]
    # Ray tasks, big tensors (here > 4 kB: the embeddings and MLPs) in blocks of rows
    ours = merge(plan, tmp_path / "ours", block_bytes=4096, log=lambda s: None)
    # the same merge in this process's threads (the CLI without a cluster), every tensor whole,
    # is bit for bit the same
    threads = merge(plan, tmp_path / "threads", in_process=True, log=lambda s: None)
    assert compare(threads, ours, models["base"])["max_abs"] == 0.0
    d = compare(ours, mergekit(plan, tmp_path / "mergekit"), models["base"])
    DIFFS[method] = d
    print(f"\nparity {method}: {json.dumps({k: round(v, 6) for k, v in d.items()})}")
    if method in ("ties", "dare_ties", "dare_linear"):
        # ties (bf16): equal magnitudes at the top-k threshold are kept in a different order by
        # mergekit's unstable argsort; dare: both draw random masks. Compare what they keep.
        assert abs(d["kept_ours"] - d["kept_theirs"]) < 0.01 * d["kept_theirs"]
        assert abs(d["delta_norm_ours"] - d["delta_norm_theirs"]) < 0.02 * d["delta_norm_theirs"]
        if method == "ties":
            assert d["frac_differing"] < 0.01
    elif method == "arcee_fusion":  # ours: bf16 as asked; mergekit writes the float32 result
        assert d["max_bf16_ulps"] <= 0.5
    else:
        assert d["max_bf16_ulps"] == 0.0, d  # bit-identical


@pytest.mark.slow
def test_reference_fusion_chain_equals_mergekit_and_loads(ray_cluster, models, tmp_path):
    """mid = fusion(base=science, other=math); final = fusion(base=code, other=mid), bf16."""
    sci, math, code = (str(models[k]) for k in ("v1", "v0", "v2"))
    steps = [{"name": "mid", "merge_method": "arcee_fusion", "base_model": sci, "models": [math], "dtype": "bfloat16"},
             {"name": "final", "merge_method": "arcee_fusion", "base_model": code, "models": ["merge:mid"],
              "dtype": "bfloat16"}]
    final = merge(steps, tmp_path / "ours", log=lambda s: None)
    assert final == tmp_path / "ours" / "final" and (tmp_path / "ours" / "mid" / "model.safetensors").exists()
    mid_mk = mergekit({**steps[0], "models": [{"model": math}]}, tmp_path / "mk_mid")
    final_mk = mergekit({**steps[1], "models": [{"model": str(mid_mk)}]}, tmp_path / "mk_final")
    d = compare(final, final_mk, models["v2"])
    DIFFS["arcee_fusion_chain"] = d
    assert d["max_bf16_ulps"] <= 0.5 and 0 < d["kept_ours"] < 0.5
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and (final / "chat_template.jinja").read_text() == \
        (models["v2"] / "chat_template.jinja").read_text()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], return_tensors="pt",
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_vocab_mismatch_refused_or_truncated_like_mergekit(ray_cluster, models, tmp_path):
    from rdistill.merge import InputError
    plan = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
            "models": [{"model": str(models["short_vocab"]), "parameters": {"weight": 1.0}}], "dtype": "float32"}
    with pytest.raises(InputError, match="vocabulary sizes differ"):
        merge(plan, tmp_path / "refused", log=lambda s: None)
    assert not (tmp_path / "refused").exists()
    out = merge(plan, tmp_path / "cut", unsafe_truncate_embeddings=True, log=lambda s: None)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 298
    emb = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    want = load_file(models["short_vocab"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(emb, want)  # weight 1 task arithmetic reproduces the other model's rows
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_cli_is_a_drop_in_for_mergekit_yaml(ray_cluster, models, tmp_path):
    cfg = tmp_path / "ties.yml"
    import yaml
    cfg.write_text(yaml.safe_dump(plans(models)["ties_fp32"]))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(REPO / "jobs" / "merge.py"), str(cfg), str(tmp_path / "out"),
           "--out-shard-size", "200K", "--lazy-unpickle", "--random-seed", "3"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # 200K parameters per shard: several shards
    from transformers import AutoModelForCausalLM
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    theirs = load_file(mergekit(plans(models)["ties_fp32"], tmp_path / "mk") / "model.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    # without a cluster the CLI merges in its own threads: no Ray, same result
    alone = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(cmd[:3] + [str(tmp_path / "alone")] + cmd[4:], env=alone, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Started a local Ray instance" not in r.stderr, r.stderr[-2000:]
    mine = AutoModelForCausalLM.from_pretrained(tmp_path / "alone").state_dict()
    assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ties\nmodels: [{model: /nowhere}]\n")
    r = subprocess.run(cmd[:2] + [str(bad), str(tmp_path / "o2")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "ties needs base_model" in r.stderr and "Traceback" not in r.stderr


def test_zz_print_parity_table():
    """Prints the largest differences per method (kept in the report)."""
    for method, d in DIFFS.items():
        print(f"{method:20s} max|diff|={d['max_abs']:.3g} max bf16 ulps={d['max_bf16_ulps']:.3g} "
              f"differing={d['frac_differing']:.4%} kept={d['kept_ours']:.4f}/{d['kept_theirs']:.4f}")


@pytest.mark.slow
def test_merge_stage_runs_candidates_and_selects_the_first(ray_cluster, models, tmp_path):
    import shutil

    from rdistill.cli.compose import load
    from rdistill import pipeline
    from rdistill.config import MergeCandidateConfig, MergeModelConfig, MergeStepConfig
    from rdistill.refs import resolve_model
    from rdistill.rundir import RunDir, write_json_atomic
    run = RunDir(tmp_path / "run")
    for stage in ("toy", "train"):  # stand-ins for the upstream stages' outputs
        write_json_atomic(run.stage_dir(stage) / "manifest.json", {"fingerprint": stage})
    shutil.copytree(models["base"], run.stage_dir("toy") / "models" / "base")
    for domain, v in (("math", "v0"), ("science", "v1"), ("code", "v2")):
        shutil.copytree(models[v], run.stage_dir("train") / domain)
    cfg = load([f"run_dir={run.root}", "stages=[merge]", "merge=toy_fusion",
                "merge.num_tasks=2"])  # the Fusion chain alone, no search (no dev set here)
    cfg.merge.candidates.append(MergeCandidateConfig(name="ties3", steps=[MergeStepConfig(
        name="t", merge_method="ties", base_model="base", parameters={"density": 0.5},
        models=[MergeModelConfig(model=f"branch:{d}", parameters={"weight": 1.0}) for d in ("math", "code", "science")])]))
    manifest = pipeline.run_stage(cfg, run, "merge")
    res = manifest["result"]
    assert res["steps"] == 3 and res["tensors_merged"] == 150 and res["default_until_dev"] == "fusion"
    assert set(res["candidates"]["fusion"]) == {"mid", "final"} and res["bytes_written"] > 0
    assert json.loads((run.stage_dir("merge") / "selection.json").read_text()) == \
        {"candidate": "fusion", "path": "merge/fusion/final"}
    from transformers import AutoModelForCausalLM
    for ref in ("merged", "merge:ties3", "merge:fusion/mid"):
        AutoModelForCausalLM.from_pretrained(resolve_model(ref, run))
    assert (run.stage_dir("merge") / "ties3" / "final").is_symlink()
    meta = json.loads((run.stage_dir("merge") / "fusion" / "final" / "rdistill_merge.json").read_text())
    assert meta["resolved"]["merge:fusion/mid"].endswith("fusion/mid")  # chained inside the stage
    assert pipeline.status(cfg, run)["merge"] == "current"
