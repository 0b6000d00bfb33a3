"""Merge plans, input checks, shard I/O and the per-tensor math against mergekit's own kernels
(no Ray here; tests/test_merge_parity.py runs whole merges through Ray against mergekit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rdistill.merge import InputError, PlanError, load_plan
from rdistill.merge.inputs import check_inputs, load_input
from rdistill.merge.methods import bernoulli, magnitude, merge_tensor
from rdistill.merge.plan import tensor_parameters

from test_merge_fixtures import make_variants


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_variants(tmp_path_factory.mktemp("merge_models"), vocab_cut=4)


# ---------------------------------------------------------------- plans

def test_mergekit_yaml_plan_with_gradients_and_filters(tmp_path):
    (tmp_path / "cfg.yml").write_text("""
merge_method: ties
base_model: /m/base
models:
  - model: /m/a
    parameters: {weight: [0.0, 1.0], density: 0.5}
  - model: /m/b
    parameters:
      weight: 0.3
      density: [{filter: mlp, value: 0.2}, {value: 0.9}]
parameters: {lambda: 0.5}
dtype: bf16
""")
    (step,) = load_plan(tmp_path / "cfg.yml")
    assert step.dtype == "bfloat16" and step.inputs == ["/m/base", "/m/a", "/m/b"]
    shared, per = tensor_parameters(step, "model.layers.2.mlp.up_proj.weight", num_layers=5)
    assert shared == {"lambda": 0.5, "normalize": True, "rescale": False, "int8_mask": False}
    assert per[0] == {"weight": 0.5, "density": 0.5}  # gradient at layer 2 of 0..4
    assert per[1] == {"weight": 0.3, "density": 0.2}  # the mlp filter matches
    _, per = tensor_parameters(step, "model.embed_tokens.weight", num_layers=5)
    assert per[0]["weight"] == 0.0 and per[1]["density"] == 0.9  # outside layers: t = 0


@pytest.mark.parametrize("plan, message", [
    ({"merge_method": "magic", "models": ["a"]}, "merge_method='magic' is invalid"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}]}, "needs weight for model a"),
    ({"merge_method": "slerp", "base_model": "b", "models": ["a", "c"], "parameters": {"t": 0.5}},
     "exactly 1 model"),
    ({"merge_method": "slerp", "base_model": "b", "models": ["a"]}, "needs parameters.t"),
    ({"merge_method": "arcee_fusion", "models": ["a"]}, "needs base_model"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"wieght": 1}}]}, "unknown parameter"),
    ({"merge_method": "linear", "slices": [1], "models": ["a"]}, "give models or slices, not both"),
    ({"merge_method": "linear", "slices": [1]}, r"slices\[0\] needs sources"),
    ({"merge_method": "linear", "modules": {"x": 1}, "models": ["a"]}, "modules is not supported"),
    ({"merge_method": "linear", "models": ["a"], "dtype": "int4"}, "dtype='int4' is invalid"),
])
def test_bad_plans_fail_with_one_line(plan, message):
    with pytest.raises(PlanError, match=message) as e:
        load_plan(plan)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- input checks

def test_input_checks_name_the_problem(models, tmp_path):
    base, v0 = load_input("base", str(models["base"])), load_input("v0", str(models["v0"]))
    shapes, cut = check_inputs([base, v0])
    assert cut is None and shapes["model.embed_tokens.weight"] == (302, 128)
    with pytest.raises(InputError, match="not found"):
        load_input("gone", str(tmp_path / "gone"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match=r"broken/model.safetensors: corrupt safetensors header"):
        load_input("broken", str(broken))
    (broken / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no safetensors weights"):
        load_input("broken", str(broken))
    short = load_input("short", str(models["short_vocab"]))
    with pytest.raises(InputError, match="vocabulary sizes differ in model.embed_tokens.weight"):
        check_inputs([base, short])
    shapes, cut = check_inputs([base, short], truncate_vocab=True)
    assert cut == 298 and shapes["model.embed_tokens.weight"] == (298, 128)


def test_streamed_shards_read_back(tmp_path):
    from safetensors.torch import load_file

    from rdistill.merge.st_io import create_shards, layout_shards, write_index, write_tensor
    tensors = {f"t{i}": torch.randn(100 + i, 7).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(6)}
    specs = [(k, tuple(v.shape), "BF16" if v.dtype == torch.bfloat16 else "F32") for k, v in tensors.items()]
    placed, headers = layout_shards(specs, max_shard_bytes=3000)
    assert len(headers) > 2
    create_shards(tmp_path, headers)
    handles = {}
    for t in reversed(placed):  # any order, any writer
        write_tensor(str(tmp_path), t, tensors[t.name], handles)
    write_index(tmp_path, placed)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    for f in set(index.values()):
        for k, v in load_file(tmp_path / f).items():
            assert torch.equal(v, tensors[k]) and index[k] == f


# ---------------------------------------------------------------- kernels against mergekit's

def test_magnitude_selection_equals_mergekit_up_to_ties():
    from mergekit.sparsify import magnitude as mk_magnitude
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(256, 300, generator=g) * 0.02
    for density in (0.1, 0.5, 0.9):
        assert torch.equal(magnitude(x32, density, False), mk_magnitude(x32, density))
        x = x32.bfloat16()  # bf16: many equal magnitudes; argsort breaks ties arbitrarily
        ours, theirs = magnitude(x, density, False), mk_magnitude(x, density)
        assert int((ours != 0).sum()) == int((theirs != 0).sum())
        k = max(1, int(density * x.numel()))
        thr = x.abs().float().reshape(-1).sort(descending=True).values[k - 1]
        differ = ours != theirs
        assert bool((x.abs().float()[differ] == thr).all())  # only at the threshold magnitude


def test_dare_statistics_match_mergekit():
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1000, 1000, generator=g).bfloat16()
    xs = [base] + [(base.float() + 0.01 * (i + 1) * torch.randn(1000, 1000, generator=g)).bfloat16() for i in range(2)]
    delta = xs[1] - base
    kept = (bernoulli(delta, 0.3, True, g) != 0).sum() / (delta != 0).sum()
    assert abs(float(kept) - 0.3) < 0.003
    for method in ("dare_ties", "dare_linear"):
        per = [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.5}]
        shared = {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        ours = merge_tensor(method, xs, shared, per, gens)
        torch.manual_seed(7)
        group = TensorGroup.from_tensors(xs, base_index=0)
        theirs = get(method)([group], parameters={"weight": [0.6, 0.4], "density": [0.3, 0.5]})[0]
        d_ours, d_theirs = (ours.float() - base.float()), (theirs.float() - base.float())
        for stat in (lambda d: (d != 0).float().mean(), lambda d: d.norm(), lambda d: d.abs().mean()):
            a, b = float(stat(d_ours)), float(stat(d_theirs))
            assert abs(a - b) <= 0.01 * abs(b), (method, a, b)
        again = merge_tensor(method, xs, shared, per, [torch.Generator().manual_seed(s) for s in (5, 6)])
        assert torch.equal(ours, again)  # seeded: reproducible


def test_arcee_fusion_matches_mergekit_exactly_small_and_statistically_large():
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method as mk
    from mergekit.merge_methods.base import TensorGroup
    g = torch.Generator().manual_seed(2)
    for shape, exact in (((300, 128), True), ((1200, 1024), False)):  # 1.2M: quantiles from a sample
        base = torch.randn(*shape, generator=g).bfloat16()
        other = (base.float() + 0.05 * torch.randn(*shape, generator=g)).bfloat16()
        ours = merge_tensor("arcee_fusion", [base, other], {}, [{}], [torch.Generator().manual_seed(3)])
        theirs = mk([TensorGroup.from_tensors([base, other], base_index=0)])[0]
        assert ours.dtype == theirs.dtype == torch.float32
        if exact:
            assert torch.equal(ours, theirs)
        else:
            k_ours, k_theirs = float((ours != base).float().mean()), float((theirs != base).float().mean())
            assert 0.01 < k_theirs < 0.5 and abs(k_ours - k_theirs) < 0.003
            assert abs(float(ours.norm()) - float(theirs.norm())) < 1e-4 * float(theirs.norm())


def _block_models(root: Path) -> list[Path]:
    """Three inputs with a big bf16 'emb' (1.2M entries: Fusion's quantiles come from a sample;
    bf16: many equal magnitudes at TIES's threshold), an fp32 'proj' and a small 'b'."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(4)
    base = {"emb": torch.randn(1200, 1024, generator=g).bfloat16(), "proj": torch.randn(300, 40, generator=g),
            "b": torch.randn(7, generator=g)}
    dirs = []
    for i in range(3):
        d = root / f"m{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
        sd = {k: (v.float() + 0.05 * (i + 1) * torch.randn(v.shape, generator=g)).to(v.dtype) if i else v
              for k, v in base.items()}
        save_file(sd, d / "model.safetensors")
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "ties_chunked", "arcee_fusion",
                                    "arcee_fusion_f32"])
def test_big_tensors_merged_in_blocks_of_rows_equal_whole_tensor_merging(tmp_path, method, monkeypatch):
    """A tensor above block_bytes is cut into blocks of rows that different tasks merge (two
    passes for TIES and Fusion); the result is bit for bit that of merging it whole."""
    from safetensors.torch import load_file

    from rdistill.merge import merge
    from rdistill.merge.execute import _tensor_seed
    dirs = [str(d) for d in _block_models(tmp_path)]
    gta = {"lambda": 0.7}
    if method == "ties_chunked":  # TIES inside a block in chunks of 3 rows (ties at the threshold span them)
        from rdistill.merge import two_pass
        monkeypatch.setattr(two_pass, "CHUNK", 3000)
        method = "ties"
    plan = {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": d, "parameters": {"weight": w}} for d, w in zip(dirs, (1.0, 0.5, 0.2))]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": dirs[0], "parameters": gta, "models": [
            {"model": d, "parameters": {"weight": 0.3}} for d in dirs[1:]]},
        "ties": {"merge_method": "ties", "base_model": dirs[0], "dtype": "bfloat16", "parameters": gta, "models": [
            {"model": dirs[1], "parameters": {"weight": 0.3, "density": 0.35}},
            {"model": dirs[2], "parameters": {"weight": 0.6, "density": 0.8}}]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": dirs[0], "dtype": "bfloat16",
                         "models": [{"model": dirs[1]}]},
        # written in float32: mergekit's float32 formula rather than the 16-bit shortcut
        "arcee_fusion_f32": {"merge_method": "arcee_fusion", "base_model": dirs[0], "dtype": "bfloat16",
                             "out_dtype": "float32", "models": [{"model": dirs[1]}]},
    }[method]
    stats: list = []
    split = merge(plan, tmp_path / "split", in_process=True, block_bytes=100_000, num_tasks=2, stats=stats,
                  log=lambda s: None)
    whole = merge(plan, tmp_path / "whole", in_process=True, block_bytes=1 << 40, log=lambda s: None)
    a, b = load_file(split / "model.safetensors"), load_file(whole / "model.safetensors")
    assert a.keys() == b.keys() == {"emb", "proj", "b"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # 'emb' (2.4 MB, or 4.8 MB in float32) went in 24+ blocks, a task each (twice for the
    # two-pass methods); 'proj' (48 kB) and 'b' stayed whole
    passes = 2 if method in ("ties", "arcee_fusion", "arcee_fusion_f32") else 1
    assert stats[0]["tasks"] >= passes * 24 + 1
    xs = [load_file(f"{d}/model.safetensors")["emb"] for d in dirs]
    if method == "ties":  # the whole-tensor reference: methods.merge_tensor (a k-th value threshold)
        shared = {"lambda": 0.7, "normalize": True, "rescale": False, "int8_mask": False}
        per = [{"weight": 0.3, "density": 0.35}, {"weight": 0.6, "density": 0.8}]
        assert torch.equal(a["emb"], merge_tensor("ties", xs, shared, per, []))
    if method.startswith("arcee_fusion"):  # mergekit's whole-tensor formula (float32), then written
        want = merge_tensor("arcee_fusion", xs[:2], {}, [{}], [torch.Generator().manual_seed(_tensor_seed(0, "emb"))])
        assert torch.equal(a["emb"], want.to(a["emb"].dtype))
        assert 0.001 < float((a["emb"] != xs[0].to(a["emb"].dtype)).float().mean()) < 0.5


def test_kth_values_of_16_bit_floats_equal_kthvalue():
    from rdistill.merge.methods import kth_values
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in (1, 2, 17, 1000, 4099):
            x = (torch.randn(n, generator=g) * 10).to(dtype)
            x[torch.rand(n, generator=g) < 0.1] = 0.0
            x[torch.rand(n, generator=g) < 0.05] = -0.0
            ks = sorted({1, max(1, n // 4), max(1, n // 2), n})
            got = kth_values(x, ks)
            assert [float(v) for v in got] == [float(torch.kthvalue(x, k).values) for k in ks]
            assert all(v.dtype == dtype and v.dim() == 0 for v in got)


def test_a_non_finite_merged_tensor_fails_the_merge_and_leaves_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    from rdistill.merge import MergeError, merge
    dirs = _block_models(tmp_path)
    sd = load_file(dirs[1] / "model.safetensors")
    sd["proj"][3, 5] = float("inf")
    save_file(sd, dirs[1] / "model.safetensors")
    plan = {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs]}
    with pytest.raises(MergeError, match=r"1 merged tensor\(s\) are not finite, e.g. \['proj'\]"):
        merge(plan, tmp_path / "out", in_process=True, log=lambda s: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_load_check_runs_when_the_layout_changes_and_catches_a_missing_tensor(tmp_path, models, monkeypatch):
    """Cutting the vocabulary changes the layout: the output is checked against transformers'
    model class (a tensor it lacks fails the merge); a merge with the donor's layout is not."""
    from rdistill.merge import MergeError, execute, merge, output
    from rdistill.merge.st_io import layout_shards
    plan = {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "dtype": "float32",
            "models": [{"model": str(models["short_vocab"]), "parameters": {"weight": 1.0}}]}
    calls = []
    real = execute.check_loads
    monkeypatch.setattr(output, "_CHECKED", set())
    monkeypatch.setattr(execute, "check_loads", lambda *a: (calls.append(a[0]), real(*a)))
    merge(plan, tmp_path / "cut", in_process=True, unsafe_truncate_embeddings=True, log=lambda s: None)
    assert len(calls) == 1
    merge({**plan, "models": [{"model": str(models["v0"]), "parameters": {"weight": 1.0}}]},
          tmp_path / "same", in_process=True, log=lambda s: None)
    assert len(calls) == 1  # the donor's layout: it loads exactly when the donor does
    placed, _ = layout_shards([("model.embed_tokens.weight", (298, 64), "F32")], 1 << 30)
    with pytest.raises(MergeError, match="out does not load in transformers: missing"):
        real(tmp_path / "cut", placed, "out")


def test_arcee_fusion_copies_an_integer_buffer_that_all_inputs_share(tmp_path):
    """Non-float tensors are not merged by any method: equal across inputs, they are copied."""
    from safetensors.torch import load_file, save_file

    from rdistill.merge import merge
    dirs = _block_models(tmp_path)
    for d in dirs:
        sd = load_file(d / "model.safetensors")
        sd["positions"] = torch.arange(10)
        save_file(sd, d / "model.safetensors")
    plan = {"merge_method": "arcee_fusion", "base_model": str(dirs[0]), "dtype": "bfloat16",
            "models": [{"model": str(dirs[1])}]}
    out = merge(plan, tmp_path / "out", in_process=True, log=lambda s: None)
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["positions"], torch.arange(10)) and got["emb"].dtype == torch.bfloat16


def test_methods_make_their_tensors_on_the_inputs_device():
    """Every method on inputs of the meta device, the CPU's stand-in for an accelerator: a tensor
    a method makes on the CPU (weights, slerp's t) fails there as it fails on CUDA (seen on an
    H200: `merge(..., device="gpu")` of a linear merge). What reads the data itself (Arcee
    Fusion's quantiles, TIES's top-k at density < 1) cannot run on meta tensors; the GPU
    benchmark checks those (benchmarks/bench_gpu.py: GPU output equal to the CPU's)."""
    from rdistill.merge.methods import METHODS, merge_tensor
    for name, spec in METHODS.items():
        if name == "arcee_fusion":
            continue
        xs = [torch.randn(8, 4, device="meta") for _ in range(2 if name == "slerp" else 3)]
        n = len(xs) - (0 if spec.base != "required" and name != "slerp" else 1)
        shared = dict(spec.shared or {}, **({"t": 0.5} if name == "slerp" else {}))
        per = [{"weight": 1.0, "density": 1.0} for _ in range(n)]
        out = merge_tensor(name, xs, shared, per, [torch.Generator() for _ in range(n)], "w")
        assert out.device.type == "meta" and out.shape == (8, 4), name
