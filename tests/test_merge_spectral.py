"""The spectral merges (TSV-M, Iso-C, Iso-CTS): equal to fusion-bench (the oracle, run in a side
environment, tests/fusion_bench_oracle.py) on small random models; merged whole, never in blocks
of rows; refused before any work for a rank larger than the layer or a bad fraction; merged by
`jobs/merge.py` from a mergekit-style YAML into a model transformers loads; drawn by the search."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rdistill.merge import merge
from rdistill.merge.methods import METHODS, merge_tensor

from test_merge_fixtures import make_variants

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"tall": (40, 12), "wide": (9, 33), "square": (16, 16), "tiny": (2, 7), "norm": (12,), "bias": (9,)}


def _toy_models(root: Path, n: int, shapes: dict = SHAPES, seed: int = 0) -> list[str]:
    """A random base and n variants (task vectors of different sizes) of odd-shaped tensors:
    tall, wide, square, a 2x7 matrix (rank below the number of models), 1-D ones."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    dirs = []
    for i in range(n + 1):
        d = root / f"m{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
        sd = {k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) if i else v for k, v in base.items()}
        save_file(sd, d / "model.safetensors")
        dirs.append(str(d))
    return dirs


def _plan(method: str, dirs: list[str], weights=None, **params) -> dict:
    weights = weights or [1.0] * (len(dirs) - 1)
    return {"merge_method": method, "base_model": dirs[0], "dtype": "float32", "parameters": params,
            "models": [{"model": d, "parameters": {"weight": w}} for d, w in zip(dirs[1:], weights)]}


# (models, method, per-model weights, lambda, extra parameters)
CASES = {
    "tsv_m": ("qwen2", "tsv_m", None, 1.0, {}),
    "tsv_m_weights": ("qwen2", "tsv_m", [0.5, 1.0, 0.7], 1.0, {}),
    "tsv_m_lambda": ("qwen2", "tsv_m", None, 0.8, {}),
    "iso_c": ("qwen2", "iso_c", None, 1.3, {}),
    "iso_c_weights": ("qwen2", "iso_c", [0.5, 1.0, 0.7], 1.0, {}),
    "iso_cts": ("qwen2", "iso_cts", None, 1.0, {}),
    "iso_cts_weights_half": ("qwen2", "iso_cts", [1.0, 0.6, 0.9], 1.2, {"common_space_fraction": 0.5}),
    "tsv_m_odd_shapes": ("odd3", "tsv_m", None, 1.0, {}),
    "iso_c_odd_shapes": ("odd3", "iso_c", None, 1.0, {}),
    "iso_cts_odd_shapes": ("odd3", "iso_cts", None, 1.0, {}),
    "tsv_m_two_models": ("odd2", "tsv_m", [0.8, 1.0], 1.0, {}),
    "iso_cts_two_models": ("odd2", "iso_cts", None, 0.9, {"common_space_fraction": 0.3}),
    # more than 4x taller than wide: Iso-CTS projects in the cheaper order (spectral.EXACT_PROJECTION_RATIO)
    "iso_cts_very_tall": ("tall", "iso_cts", [1.0, 0.8, 0.6], 1.0, {}),
}
TOLERANCE = {"iso_cts_very_tall": 3e-5}  # measured 2.5e-6 here; everything else follows fusion-bench's order


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Every case merged by rdistill (the streaming merge, in float32, tensors above 4 kB
    eligible for blocks of rows) and by fusion-bench; {case: (ours, theirs, base)} files."""
    from fusion_bench_oracle import run_oracle
    root = tmp_path_factory.mktemp("spectral")
    q = make_variants(root / "qwen2")
    inputs = {"qwen2": [str(q["base"])] + [str(q[f"v{i}"]) for i in range(3)],
              "odd3": _toy_models(root / "odd3", 3), "odd2": _toy_models(root / "odd2", 2, seed=1),
              "tall": _toy_models(root / "tall", 3, {"very_tall": (90, 10), "b": (10,)}, seed=2)}
    jobs, out = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the oracle runs: LAPACK's reductions in the same order
    try:
        for name, (models, method, weights, lam, extra) in CASES.items():
            dirs = inputs[models]
            ours = merge(_plan(method, dirs, weights, **{"lambda": lam}, **extra), root / name, in_process=True,
                         block_bytes=4096, log=lambda s: None) / "model.safetensors"
            theirs = root / f"{name}.fusion_bench.safetensors"
            jobs.append({"method": method, "base": f"{dirs[0]}/model.safetensors", "lambda": lam, "out": str(theirs),
                         "models": [f"{d}/model.safetensors" for d in dirs[1:]], "weights": weights, **extra})
            out[name] = (ours, theirs, Path(dirs[0]) / "model.safetensors")
    finally:
        torch.set_num_threads(threads)
    run_oracle(jobs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_spectral_merges_equal_fusion_bench(oracle, case):
    ours_f, theirs_f, base_f = oracle[case]
    ours, theirs, base = load_file(ours_f), load_file(theirs_f), load_file(base_f)
    assert ours.keys() == theirs.keys() == base.keys()
    err = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print(f"\nparity {case}: max |rdistill - fusion-bench| = {err:.3g}")
    assert err <= TOLERANCE.get(case, 1e-5)
    for k, b in base.items():
        moved = float((ours[k] - b).abs().max())
        if b.dim() == 2 and min(b.shape) >= 3:
            assert moved > 1e-3, (k, moved)  # the method changed every matrix


@pytest.mark.slow
def test_non_matrix_tensors_get_the_mean_task_vector_and_matrices_do_not(oracle):
    """1-D tensors: base + lambda * mean_i(w_i tau_i) (fusion-bench's choice, checked here
    without it); 2-D ones: something else than that mean (the spectral merge)."""
    ours = load_file(oracle["iso_cts_weights_half"][0])
    dirs = [Path(oracle["iso_cts_weights_half"][2]).parent] + \
        [Path(oracle["iso_cts_weights_half"][2]).parent.parent / f"v{i}" for i in range(3)]
    sds = [load_file(d / "model.safetensors") for d in dirs]
    ws, lam = [1.0, 0.6, 0.9], 1.2
    for k, b in sds[0].items():
        mean = b + lam * sum(w * (sd[k] - b) for w, sd in zip(ws, sds[1:])) / 3
        diff = float((ours[k] - mean).abs().max())
        assert (diff < 1e-6) if b.dim() == 1 else (diff > 1e-3), (k, diff)


def test_tsv_m_keeps_rank_fraction_of_each_layer_per_model():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(60, 40, generator=g)
    xs = [base] + [base + 0.1 * torch.randn(60, 40, generator=g) for _ in range(3)]
    per = [{"weight": 1.0}] * 3
    for fraction, rank in ((0.0, 3 * 13), (1 / 6, 3 * 6), (0.05, 3 * 2)):
        y = merge_tensor("tsv_m", xs, {"lambda": 1.0, "rank_fraction": fraction}, per, [])
        assert int(torch.linalg.matrix_rank(y - base)) == rank, fraction


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 20, generator=g)
    taus = [0.1 * (i + 1) * torch.randn(30, 20, generator=g) for i in range(3)]
    ws = [1.0, 0.5, 2.0]
    y = merge_tensor("iso_c", [base] + [base + t for t in taus], {"lambda": 0.7}, [{"weight": w} for w in ws], [])
    s = torch.linalg.svdvals(y - base)
    want = torch.linalg.svdvals(sum(w * t for w, t in zip(ws, taus)))
    assert torch.allclose(s, torch.full_like(s, 0.7 * float(want.mean())), rtol=1e-4)
    u, _, vh = torch.linalg.svd(sum(w * t for w, t in zip(ws, taus)), full_matrices=False)
    assert torch.allclose(y - base, 0.7 * float(want.mean()) * u @ vh, atol=1e-5)  # same singular vectors


def test_spectral_tensors_are_merged_whole_never_in_blocks_of_rows(tmp_path):
    """An SVD needs the whole matrix: a tensor far above block_bytes still goes to one task, and
    the result equals merging it whole (methods.merge_tensor)."""
    from rdistill.merge.execute import Options, _blocks
    from rdistill.merge.st_io import OutTensor, TensorLoc
    from rdistill.merge.work import UnitTensor
    dirs = _toy_models(tmp_path / "m", 3, {"big": (300, 40), "b": (40,)})
    big = UnitTensor(OutTensor("big", (300, 40), "F32", "model.safetensors", 0, 48000),
                     [TensorLoc("x", "F32", (300, 40), 0, 48000)] * 4, None, {}, [{}] * 3, 0)
    for method in ("tsv_m", "iso_c", "iso_cts"):
        assert len(_blocks(big, method, "float32", Options(block_bytes=1000), 2, 1 << 30)[0]) == 1
    assert len(_blocks(big, "task_arithmetic", "float32", Options(block_bytes=1000), 2, 1 << 30)[0]) > 40  # the contrast
    xs = [load_file(f"{d}/model.safetensors")["big"] for d in dirs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("tsv_m", "iso_c", "iso_cts"):
            stats: list = []
            out = merge(_plan(method, dirs, [0.5, 1.0, 0.8], **{"lambda": 0.9}), tmp_path / method, in_process=True,
                        block_bytes=1000, num_tasks=2, stats=stats, log=lambda s: None)
            assert stats[0]["tasks"] <= 2  # 2 tensors, packed in units: no task per block
            shared, per = dict(METHODS[method].shared, **{"lambda": 0.9}), [{"weight": w} for w in (0.5, 1.0, 0.8)]
            want = merge_tensor(method, xs, shared, per, [])
            assert torch.allclose(load_file(out / "model.safetensors")["big"], want, atol=1e-6, rtol=0), method
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("params, message", [
    ({"rank_fraction": 0.5}, r"tsv_m: rank_fraction=0.5 keeps rank 2 per model of odd \(5x16, rank 5\), 6 for "
                             r"3 models, more than the layer has: use rank_fraction <= 1/3"),
    ({"rank_fraction": -0.1}, r"tsv_m: rank_fraction=-0.1 is invalid"),
    ({"common_space_fraction": 1.5}, r"iso_cts: common_space_fraction=1.5 is invalid"),
    ({"common_space_fraction": 0.0}, r"iso_cts: common_space_fraction=0 leaves 6 task-specific directions \(2 per "
                                     r"model\) of odd \(5x16\), more than its rank 5: raise common_space_fraction"),
    ({"density": 0.5}, r"unknown parameter\(s\) \['density'\] for iso_c"),
])
def test_bad_spectral_parameters_fail_before_any_work_in_one_line(tmp_path, params, message):
    from rdistill.merge import PlanError
    dirs = _toy_models(tmp_path / "m", 3, {**SHAPES, "odd": (5, 16)})
    method = "tsv_m" if "rank_fraction" in params else "iso_c" if "density" in params else "iso_cts"
    with pytest.raises(PlanError, match=message) as e:
        merge(_plan(method, dirs, **params), tmp_path / "out", in_process=True, log=lambda s: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing written


def test_mismatched_shapes_are_refused_before_any_work(tmp_path):
    from rdistill.merge import InputError
    dirs = _toy_models(tmp_path / "m", 2)
    sd = load_file(f"{dirs[2]}/model.safetensors")
    sd["wide"] = torch.zeros(9, 34)
    save_file(sd, f"{dirs[2]}/model.safetensors")
    with pytest.raises(InputError, match=r"tensor wide has different shapes"):
        merge(_plan("tsv_m", dirs), tmp_path / "out", in_process=True, log=lambda s: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_merges_tiny_qwen2_from_a_spectral_yaml_into_a_loadable_model(tmp_path):
    """`jobs/merge.py CFG OUT` as a user runs it (no cluster: the process's threads), a tsv_m and an
    iso_cts YAML: the model loads in transformers, generates finite logits, and equals the Python
    API's merge; a bad fraction fails in one line, exit code 2."""
    import yaml
    from transformers import AutoModelForCausalLM
    m = make_variants(tmp_path / "models")
    models = [{"model": str(m[f"v{i}"]), "parameters": {"weight": w}} for i, w in enumerate((1.0, 0.7, 0.9))]
    plans = {"tsv_m": {"merge_method": "tsv_m", "base_model": str(m["base"]), "models": models,
                       "parameters": {"lambda": 1.1}, "dtype": "float32"},
             "iso_cts": {"merge_method": "iso_cts", "base_model": str(m["base"]), "models": models,
                         "parameters": {"lambda": 1.0, "common_space_fraction": 0.7}, "dtype": "bfloat16"}}
    for name, plan in plans.items():
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(plan))
        r = subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), str(cfg), str(tmp_path / name)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        ids = torch.tensor([[1, 5, 9, 42]])
        assert torch.isfinite(model(ids).logits).all()
        got = load_file(tmp_path / name / "model.safetensors")
        want = load_file(merge(plan, tmp_path / f"{name}_api", in_process=True, log=lambda s: None) / "model.safetensors")
        dtype = torch.float32 if name == "tsv_m" else torch.bfloat16
        assert all(v.dtype == dtype for v in got.values())
        err = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
        assert err <= (1e-6 if name == "tsv_m" else 2 ** -7), (name, err)  # bf16: at most one rounding apart
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({**plans["tsv_m"], "parameters": {"rank_fraction": 0.4}}))
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), str(bad), str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [s for s in r.stderr.splitlines() if s.startswith("error:")]
    assert len(line) == 1 and "tsv_m: rank_fraction=0.4 keeps rank 51 per model of model.embed_tokens.weight" in line[0]
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------- the search

def test_search_draws_the_spectral_merges_with_per_branch_weights():
    from rdistill.config import MergeSearchConfig
    from rdistill.merge.plan import step_from_dict
    from rdistill.merge.search import candidate_space, neighbours
    doms = ["math", "code", "science"]
    cands = candidate_space(doms, MergeSearchConfig(candidates=60, common_space_fractions=[0.5, 0.8],
                                                    lambdas=[0.8, 1.0]))
    for method in ("tsv_m", "iso_c", "iso_cts"):
        mine = [c for c in cands if c.steps[0]["merge_method"] == method]
        assert mine[0].label == f"{method} w=1/1/1 lambda=1" + (" common=0.8" if method == "iso_cts" else "")
        weights = [tuple(m["parameters"]["weight"] for m in c.steps[0]["models"]) for c in mine]
        assert any(len(set(w)) > 1 for w in weights), method  # drawn per branch
        for c in mine:
            step = step_from_dict(c.steps[0])  # a valid plan: the method's own parameters only
            assert step.base_model == "base" and [x.model for x in step.models] == [f"branch:{d}" for d in doms]
    assert {c.steps[0]["parameters"].get("common_space_fraction") for c in cands
            if c.steps[0]["merge_method"] == "iso_cts"} == {0.5, 0.8}
    # refinement moves one branch's weight; weights 0.5/0.5/0.5 at lambda 1 are 1/1/1 at lambda 0.5
    tsv = next(c for c in cands if c.label == "tsv_m w=1/1/1 lambda=1")
    near = neighbours(tsv, MergeSearchConfig(weights=[0.5, 0.85, 1.0]), 0, set())
    assert [c.label for c in near] == ["tsv_m w=0.85/1/1 lambda=1", "tsv_m w=1/0.85/1 lambda=1",
                                       "tsv_m w=1/1/0.85 lambda=1"]
    from rdistill.merge.search import _label
    assert _label("iso_c", [0.5, 0.5, 0.5], 0.5, 1.0) == _label("iso_c", [1, 1, 1], 0.5, 0.5) == "iso_c w=1/1/1 lambda=0.5"


def test_search_config_refuses_a_bad_common_space_fraction():
    from rdistill.config import ConfigError, MergeSearchConfig
    from rdistill.config.fields import check
    with pytest.raises(ConfigError, match=r"common_space_fractions=\[0.8, 1.2\] is invalid"):
        check(MergeSearchConfig(common_space_fractions=[0.8, 1.2]))

