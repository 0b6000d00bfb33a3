"""Spectral merges against TIES on the same inputs: `jobs/merge.py CFG OUT` as a user runs it (its
own process, merging in its threads): wall time, CPU time and peak memory, alternating, medians.

    .venv/bin/python benchmarks/bench_spectral.py [--hidden 512] [--vocab 32000] [--layers 4] [--repeats 2]

Builds a random Qwen2-shaped base (bf16) and three variants (base + noise of different sizes),
then merges the three over the base with `ties` (density 0.5) and with `tsv_m`, `iso_c`,
`iso_cts` (default parameters), all with dtype bfloat16 (the spectral ones compute their SVDs in
float32 inside). Prints one row per method and its ratios to TIES.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from bench_merge import _plan_file  # noqa: E402

METHODS = ["ties", "tsv_m", "iso_c", "iso_cts"]


def make_models(work: Path, hidden: int, vocab: int, layers: int) -> dict[str, Path]:
    """base, v0, v1, v2: Qwen2 shapes (intermediate 2.75 x hidden), bf16, one shard each."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config
    inter = int(hidden * 2.75)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True,
                      architectures=["Qwen2ForCausalLM"])
    cfg.dtype = "bfloat16"
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{n}_proj.weight"] = (hidden, hidden)
        for n in ("q", "k", "v"):
            shapes[f"{p}self_attn.{n}_proj.bias"] = (hidden,)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    out = {}
    for i, name in enumerate(["base", "v0", "v1", "v2"]):
        d = work / name
        out[name] = d
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        g, gv = torch.Generator().manual_seed(0), torch.Generator().manual_seed(100 + i)
        sd = {}
        for k, shape in shapes.items():
            t = torch.randn(shape, generator=g) * 0.02 + (1.0 if k.endswith("norm.weight") else 0.0)
            if i:
                t += 0.002 * i * torch.randn(shape, generator=gv)
            sd[k] = t.to(torch.bfloat16)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return out


def timed(cmd: list[str], out: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, peak MB) of a command in its own process; CPU seconds (user + system) hold
    up on a loaded machine, where wall time is whatever share of the cores it got."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr.read()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def plan(method: str, m: dict[str, Path]) -> dict:
    ws = (1.0, 0.5, 0.7)
    per = [{"weight": w, **({"density": 0.5} if method == "ties" else {})} for w in ws]
    return {"merge_method": method, "base_model": str(m["base"]), "dtype": "bfloat16",
            "models": [{"model": str(m[v]), "parameters": p} for v, p in zip(("v0", "v1", "v2"), per)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/rdistill_bench_spectral")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    models = make_models(work, a.hidden, a.vocab, a.layers)
    size = (models["base"] / "model.safetensors").stat().st_size
    print(f"models: 4 x {size / 1e6:.0f} MB bf16 (hidden {a.hidden}, vocab {a.vocab}, {a.layers} layers); "
          f"largest matrix {a.vocab} x {a.hidden}", flush=True)
    methods = a.methods.split(",")
    runs: dict[str, list] = {m: [] for m in methods}
    for r in range(a.repeats):
        for m in methods:  # alternating: the machine's load falls on every method alike
            out = work / f"out_{m}"
            cmd = [sys.executable, str(REPO / "jobs" / "merge.py"), str(_plan_file(plan(m, models), work, m)), str(out)]
            runs[m].append(timed(cmd, out))
            w, c, p = runs[m][-1]
            print(f"  run {r + 1} {m}: {w:.1f}s wall, {c:.1f} CPU s, peak {p:.0f} MB", flush=True)
    med = {m: tuple(statistics.median(x[i] for x in v) for i in range(3)) for m, v in runs.items()}
    ref = med.get("ties")
    print(f"\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, medians of {a.repeats}\n")
    print("| method | wall s | CPU s | peak GB | CPU / TIES | peak / TIES |")
    print("|---|---|---|---|---|---|")
    for m, (w, c, p) in med.items():
        rel = f"{c / ref[1]:.1f}x | {p / ref[2]:.2f}x" if ref else "- | -"
        print(f"| {m} | {w:.1f} | {c:.1f} | {p / 1024:.2f} | {rel} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
