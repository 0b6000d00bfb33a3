"""Merge benchmark: `jobs/merge.py CFG OUT` against `mergekit-yaml CFG OUT` on the same inputs,
as a user runs them (whole processes, start-up included, alternating), over a sweep of model
shapes: wall time and peak memory for TIES, Arcee Fusion and linear. Then the CLI's peak under
a fixed `--max-memory` at two model sizes (flat in model size).

    .venv/bin/python benchmarks/bench_merge.py [--work DIR] [--shapes embedding,mid,deep]
        [--methods ties,arcee_fusion,linear] [--repeats 2] [--scale 1] [--flat-budget 256M]

Shapes (random Qwen2-shaped bf16 models, a base and three variants = base + noise, inputs in
shards of about 100 MB):
- embedding: one dominant embedding matrix (152k x 512, 93% of the bytes), 2 layers;
- mid: many mid-sized tensors (hidden 1024, MLP 2816, 6 layers x --scale, 32k vocabulary);
- deep: many layers with a small vocabulary (hidden 256, 48 layers, 4k vocabulary).

Memory is measured the same way for both programs (benchmarks/procmem.py): the peak over time
of the process tree's anonymous resident memory (RssAnon summed over the process and its
children, sampled every 3 ms: heap and tensors, not the page cache or mmapped input files),
(Not the kernel's ru_maxrss: a child forked from this process, which holds the generated models,
starts with this process's high-water mark, so it read the same 1.5 GB for every command.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.procmem import measure  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, vocabulary
    "embedding": (512, 1408, 2, 151936),
    "mid": (1024, 2816, 6, 32000),
    "deep": (256, 704, 48, 4096),
}


def _tensors(h: int, inter: int, layers: int, vocab: int) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{n}_proj.weight"] = (h, h)
        for n in ("q", "k", "v"):
            shapes[f"{p}self_attn.{n}_proj.bias"] = (h,)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    return shapes


def make_models(work: Path, shape: str, scale: int = 1, shard_mb: int = 100) -> dict[str, Path]:
    """{base, v0, v1, v2}: a random Qwen2 of `shape` (layers x scale) and three variants."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config
    h, inter, layers, vocab = SHAPES[shape]
    layers *= scale
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=h // 64, num_key_value_heads=h // 64, tie_word_embeddings=True,
                      architectures=["Qwen2ForCausalLM"])
    cfg.dtype = "bfloat16"
    shapes = _tensors(h, inter, layers, vocab)
    root = work / f"{shape}x{scale}"
    out = {n: root / n for n in ("base", "v0", "v1", "v2")}
    if all((d / "config.json").exists() for d in out.values()):
        return out
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).mul_(0.02).add_(1.0 if k.endswith("norm.weight") else 0.0)
            for k, s in shapes.items()}  # float32: each variant adds its noise before rounding
    for i, d in enumerate(out.values()):
        d.mkdir(parents=True, exist_ok=True)
        gv = torch.Generator().manual_seed(100 + i)
        shards: list[dict] = [{}]
        size = 0
        for k, t in base.items():
            t = (t + 0.002 * i * torch.randn(t.shape, generator=gv) if i else t).to(torch.bfloat16)
            if shards[-1] and size + t.nbytes > shard_mb << 20:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += t.nbytes
        wmap = {}
        for j, sd in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sd, d / fname, metadata={"format": "pt"})
            wmap.update({k: fname for k in sd})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        cfg.save_pretrained(d)  # last: its presence marks a complete model
    return out


def plans(m: dict[str, Path]) -> dict[str, dict]:
    s = {k: str(v) for k, v in m.items()}
    return {
        "ties": {"merge_method": "ties", "base_model": s["base"], "dtype": "bfloat16", "models": [
            {"model": s[v], "parameters": {"weight": w, "density": d}}
            for v, w, d in (("v0", 1.0, 0.5), ("v1", 0.5, 0.3), ("v2", 0.7, 0.7))]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": s["v1"], "dtype": "bfloat16",
                         "out_dtype": "bfloat16", "models": [{"model": s["v0"]}]},
        "linear": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": s["v0"], "parameters": {"weight": 1.0}}, {"model": s["v1"], "parameters": {"weight": 0.5}},
            {"model": s["v2"], "parameters": {"weight": 0.25}}]},
    }


def model_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _run(cmd: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the CLI alone: its threads
    r = measure(cmd, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if r["rc"]:
        raise SystemExit(f"{cmd[0]} failed (exit {r['rc']}): {r['stderr'][-2000:]}")
    return r


def run_mergekit(cfg: Path, out: Path) -> dict:
    exe = Path(sys.executable).parent / "mergekit-yaml"
    return _run([str(exe), str(cfg), str(out), "--no-write-model-card", "--quiet"], out)


def run_cli(cfg: Path, out: Path, *extra: str) -> dict:
    return _run([sys.executable, str(REPO / "jobs" / "merge.py"), str(cfg), str(out), *extra], out)


def _cfg(plan: dict, work: Path, name: str) -> Path:
    import yaml
    cfg = work / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(plan))
    return cfg


def sweep(work: Path, shapes: list[str], methods: list[str], repeats: int, scale: int) -> list[dict]:
    """Every shape x method: both CLIs alternating, medians of `repeats`."""
    rows = []
    print("| shape | method | mergekit s | rdistill s | speed-up | mergekit peak anon MB | rdistill peak anon MB "
          "| memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        models = make_models(work, shape, scale)
        for name in methods:
            cfg = _cfg(plans(models)[name], work, f"{shape}_{name}")
            mk, rd = [], []
            for _ in range(repeats):
                mk.append(run_mergekit(cfg, work / "out_mk"))
                rd.append(run_cli(cfg, work / "out_rd"))
            med = {f"{who}_{k}": statistics.median(r[k] for r in runs) for who, runs in (("mk", mk), ("rd", rd))
                   for k in ("wall_s", "peak_anon_bytes", "maxrss_bytes")}
            row = {"shape": shape, "method": name, "model_mb": model_bytes(models["base"]) / 1e6, **med}
            rows.append(row)
            print(f"| {shape} ({row['model_mb']:.0f} MB) | {name} | {med['mk_wall_s']:.1f} | {med['rd_wall_s']:.1f} "
                  f"| {med['mk_wall_s'] / med['rd_wall_s']:.1f}x | {med['mk_peak_anon_bytes'] / 2**20:.0f} "
                  f"| {med['rd_peak_anon_bytes'] / 2**20:.0f} "
                  f"| {med['rd_peak_anon_bytes'] / med['mk_peak_anon_bytes']:.2f} |", flush=True)
    return rows


def flat(work: Path, budget: str, scales: list[int], methods: list[str]) -> None:
    """The CLI's peak under one --max-memory at two model sizes (the mid shape, layers x scale)."""
    print(f"\nPeak under --max-memory {budget} (mid shape):")
    print("| method | " + " | ".join(f"model MB (x{s}) | peak anon MB (x{s})" for s in scales) + " |")
    print("|---|" + "---|---|" * len(scales))
    for name in methods:
        cells = []
        for s in scales:
            models = make_models(work, "mid", s)
            r = run_cli(_cfg(plans(models)[name], work, f"flat_{name}_{s}"), work / "out_rd", "--max-memory", budget)
            cells += [f"{model_bytes(models['base']) / 1e6:.0f}", f"{r['peak_anon_bytes'] / 2**20:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/rdistill_bench_merge")
    ap.add_argument("--shapes", default="embedding,mid,deep")
    ap.add_argument("--methods", default="ties,arcee_fusion,linear")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each CLI (medians)")
    ap.add_argument("--scale", type=int, default=1, help="layers x scale")
    ap.add_argument("--flat-budget", default="256M", help="--max-memory of the two-size run ('' skips it)")
    ap.add_argument("--flat-scales", default="1,3")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    methods = a.methods.split(",")
    try:
        sweep(work, a.shapes.split(","), methods, a.repeats, a.scale)
        if a.flat_budget:
            flat(work, a.flat_budget, [int(s) for s in a.flat_scales.split(",")], methods)
        print(f"\n{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; {time.time() - t0:.0f} s in all")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
