"""mergekit's own examples/ (tests/fixtures/mergekit_examples, model names swapped for small
local models), each merged by jobs/merge.py's code and by mergekit itself: the same output to the
parity tests' tolerances; the one example rdistill does not take (layer stacking) is refused in
one line. Then the memory budget: a merge under a quarter of one model's size gives the same
bytes within budget + a stated overhead; a budget too small fails before any work naming the
smallest that works."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rdistill.cli.merge import main as cli_main

from test_merge_fixtures import make_variants
from test_merge_parity import compare, mergekit

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "tests" / "fixtures" / "mergekit_examples"
TIES = ("bio-merge.yml", "ties.yml", "two-slices-ties.yml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_variants(tmp_path_factory.mktemp("examples"))


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yml")
                                           if p.name not in ("orcamini-platy-44layer.yml", "multi.yml")))
def test_mergekit_example_gives_mergekits_output(models, tmp_path, monkeypatch, example):
    import yaml
    monkeypatch.chdir(models["base"].parent)  # the examples name the models base, v0, v1, v2
    plan = yaml.safe_load((EXAMPLES / example).read_text())
    assert cli_main([str(EXAMPLES / example), str(tmp_path / "ours")]) == 0
    d = compare(tmp_path / "ours", mergekit(plan, tmp_path / "mk"), models["base"])
    if example in TIES:  # equal magnitudes at the top-k threshold: mergekit's unstable argsort
        assert abs(d["kept_ours"] - d["kept_theirs"]) < 0.01 * d["kept_theirs"]
        assert abs(d["delta_norm_ours"] - d["delta_norm_theirs"]) < 0.02 * d["delta_norm_theirs"]
        assert d["frac_differing"] < 0.01, d
    elif example == "arcee_fusion.yml":  # ours bf16 as asked; mergekit writes the float32 result
        assert d["max_bf16_ulps"] <= 0.5, d
    else:
        assert d["max_abs"] == 0.0, d  # bit-identical


def test_a_multi_document_config_is_mergekit_multis_chain(models, tmp_path, monkeypatch):
    """mergekit-multi's form (mega.yml's chain): the named gradient SLERP goes to the intermediate
    folder as mergekit writes it, and the TIES over it to OUT_DIR, as mergekit-multi makes it
    (each document merged by mergekit, the name replaced by the intermediate's path)."""
    import yaml
    monkeypatch.chdir(models["base"].parent)
    first, last = yaml.safe_load_all((EXAMPLES / "multi.yml").read_text())
    out = tmp_path / "ours"
    assert cli_main([str(EXAMPLES / "multi.yml"), str(out)]) == 0
    inter = tmp_path / "ours.intermediate" / "gradient-slerp"
    mk_inter = mergekit({k: v for k, v in first.items() if k != "name"}, tmp_path / "mk-inter")
    assert compare(inter, mk_inter, models["base"])["max_abs"] == 0.0
    for m in last["models"]:
        m["model"] = str(mk_inter) if m["model"] == "gradient-slerp" else m["model"]
    d = compare(out, mergekit(last, tmp_path / "mk"), models["base"])
    assert abs(d["kept_ours"] - d["kept_theirs"]) < 0.01 * d["kept_theirs"] and d["frac_differing"] < 0.01, d
    assert not (out / "gradient-slerp").exists()  # the final model's folder holds the final model only


def test_a_multi_document_config_without_names_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text("merge_method: linear\nmodels: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: b}]\n")
    assert cli_main([str(cfg), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {cfg}: every document but the last needs a name (mergekit-multi's intermediate "
                   "merges), by which later documents refer to it")


def test_slices_equal_models_with_per_slice_parameters(models, tmp_path, monkeypatch):
    """gradient-slerp's slices (one slice over every layer) are its models: form, bit for bit."""
    import yaml

    from rdistill.merge import merge
    monkeypatch.chdir(models["base"].parent)
    plan = yaml.safe_load((EXAMPLES / "gradient-slerp.yml").read_text())
    as_models = {k: v for k, v in plan.items() if k != "slices"} | {"models": [{"model": "base"}, {"model": "v0"}]}
    a = load_file(merge(plan, tmp_path / "s", log=lambda s: None) / "model.safetensors")
    b = load_file(merge(as_models, tmp_path / "m", log=lambda s: None) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("slices, message", [
    ("orcamini-platy-44layer.yml", "passthrough: layer stacking (passthrough, frankenmerges) is not supported"),
    ([{"sources": [{"model": "base", "layer_range": [0, 3]}, {"model": "v0", "layer_range": [1, 4]}]}],
     "slices[0]: its sources span different layers [(0, 3), (1, 4)]: layer stacking"),
    ([{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "v0", "layer_range": [0, 2]}]}],
     "the slices end at layer 2 but the models have 4: layer stacking"),
    ([{"sources": [{"model": m, "layer_range": r} for m in ("base", "v0")]} for r in ([0, 2], [0, 4])],
     "slices[1] covers layers [0, 4) after layer 2: layer stacking"),
])
def test_layer_stacking_is_refused_in_one_line(models, tmp_path, monkeypatch, capsys, slices, message):
    import yaml
    monkeypatch.chdir(models["base"].parent)
    cfg = EXAMPLES / slices if isinstance(slices, str) else tmp_path / "c.yml"
    if not isinstance(slices, str):
        cfg.write_text(yaml.safe_dump({"slices": slices, "merge_method": "slerp", "base_model": "base",
                                       "parameters": {"t": 0.5}}))
    assert cli_main([str(cfg), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the memory budget

def _wide_models(root: Path) -> dict[str, Path]:
    """A base and three variants of 39 MB each (bf16; a 32000 x 512 embedding is 84% of it)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_merge import SHAPES, make_models
    SHAPES["test"] = (512, 1408, 1, 32000)
    return make_models(root, "test")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    yield _wide_models(root)
    shutil.rmtree(root, ignore_errors=True)


OVERHEAD = 64 << 20
"""What the CLI holds beyond its start-up footprint and the budget: thread stacks, the plan,
allocator slack (stated in docs/merge.md)."""


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_a_quarter_model_budget_gives_the_same_bytes_within_budget(wide, tmp_path, method):
    import yaml

    from benchmarks.bench_merge import model_bytes, plans
    from benchmarks.procmem import measure
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(plans(wide)[method]))
    budget = model_bytes(wide["base"]) // 4
    start = measure([sys.executable, "-c", "import torch, rdistill.cli.merge, rdistill.merge.execute"])
    run = [sys.executable, str(REPO / "jobs" / "merge.py"), str(cfg)]
    small = measure(run + [str(tmp_path / "small"), "--max-memory", str(budget)])
    assert small["rc"] == 0, small["stderr"][-2000:]
    free = measure(run + [str(tmp_path / "free")])
    assert free["rc"] == 0, free["stderr"][-2000:]
    for f in (tmp_path / "free").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "small" / f.name).read_bytes(), f.name
    bound = start["peak_anon_bytes"] + budget + OVERHEAD
    print(f"\n{method}: budget {budget >> 20} MiB, start-up {start['peak_anon_bytes'] >> 20} MiB, peak "
          f"{small['peak_anon_bytes'] >> 20} MiB (bound {bound >> 20}); unbounded {free['peak_anon_bytes'] >> 20} MiB")
    assert small["peak_anon_bytes"] <= bound


def test_a_budget_too_small_for_one_row_fails_first_naming_the_least_that_works(models, tmp_path, capsys):
    import re

    import yaml
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(models["base"]), "dtype": "bfloat16",
                                   "models": [{"model": str(models[v]), "parameters": {"weight": 1.0, "density": 0.5}}
                                              for v in ("v0", "v1")]}))
    assert cli_main([str(cfg), str(tmp_path / "out"), "--max-memory", "1K"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: memory budget 1.0K (--max-memory, merge.max_memory_gb) cannot hold one row of ")
    assert "\n" not in err and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    least = int(re.search(r"the smallest budget that works is \S+ \((\d+) bytes\)", err).group(1))
    assert cli_main([str(cfg), str(tmp_path / "out"), "--max-memory", str(least)]) == 0
    assert cli_main([str(cfg), str(tmp_path / "out2"), "--max-memory", str(least * 9 // 10)]) == 2
