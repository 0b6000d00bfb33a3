"""Merge benchmark: rdistill's streaming Ray merge against mergekit's CLI, and the I/O floor; then
both command lines end to end as a user runs them (`jobs/merge.py` merges in its own threads when
no cluster is given), alternating.

    .venv/bin/python benchmarks/bench_merge.py [--work DIR] [--size-gb 1.0] [--methods linear,ties,arcee_fusion]

Builds a random Qwen2-shaped base (about --size-gb in bf16) and three variants (base + noise),
then for each method merges them with `mergekit-yaml` (a subprocess; peak RSS from the kernel)
and with `rdistill.merge.merge` on a Ray cluster of this machine's cores (workers started before
timing, as in a running pipeline; memory = the sum of the merge workers' peak RSS plus the
driver's growth), and prints wall time, peak memory, their ratios, and the floor: reading every
input byte and writing the output once. Ray's own start-up is timed and printed separately.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def make_models(work: Path, size_gb: float) -> dict[str, Path]:
    """base, v0, v1, v2: Qwen2 shapes (hidden 1024, 24 layers at 1 GB), bf16, one shard each."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config
    layers = max(2, round(24 * (size_gb * 1e9 / 2 - 155.6e6) / 308e6))
    cfg = Qwen2Config(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True,
                      architectures=["Qwen2ForCausalLM"])
    cfg.dtype = "bfloat16"
    shapes = {"model.embed_tokens.weight": (151936, 1024), "model.norm.weight": (1024,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{n}_proj.weight"] = (1024, 1024)
        for n in ("q", "k", "v"):
            shapes[f"{p}self_attn.{n}_proj.bias"] = (1024,)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (2816, 1024)
        shapes[f"{p}mlp.down_proj.weight"] = (1024, 2816)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (1024,)
    out = {}
    for i, name in enumerate(["base", "v0", "v1", "v2"]):
        d = work / name
        out[name] = d
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        g = torch.Generator().manual_seed(0)  # the same base draw for every model
        gv = torch.Generator().manual_seed(100 + i)
        sd = {}
        for k, shape in shapes.items():
            t = torch.randn(shape, generator=g) * 0.02 + (1.0 if k.endswith("norm.weight") else 0.0)
            if i:
                t += 0.002 * i * torch.randn(shape, generator=gv)
            sd[k] = t.to(torch.bfloat16)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        del sd
    return out


def plans(m: dict[str, Path]) -> dict[str, dict]:
    s = {k: str(v) for k, v in m.items()}
    return {
        "linear": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": s["v0"], "parameters": {"weight": 1.0}}, {"model": s["v1"], "parameters": {"weight": 0.5}},
            {"model": s["v2"], "parameters": {"weight": 0.25}}]},
        "ties": {"merge_method": "ties", "base_model": s["base"], "dtype": "bfloat16", "models": [
            {"model": s[v], "parameters": {"weight": w, "density": d}}
            for v, w, d in (("v0", 1.0, 0.5), ("v1", 0.5, 0.3), ("v2", 0.7, 0.7))]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": s["v1"], "dtype": "bfloat16",
                         "out_dtype": "bfloat16", "models": [{"model": s["v0"]}]},
    }


def inputs_of(plan: dict) -> list[str]:
    return ([plan["base_model"]] if plan.get("base_model") else []) + [m["model"] for m in plan["models"]]


def floor(plan: dict, out: Path) -> float:
    """Read every input byte once and write an output of the base's size once (no math)."""
    t0 = time.time()
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for d in inputs_of(plan):
        with open(Path(d) / "model.safetensors", "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    size = (Path(inputs_of(plan)[0]) / "model.safetensors").stat().st_size
    with open(out, "wb", buffering=0) as f:
        left = size
        while left > 0:
            n = f.write(view[:min(left, len(buf))])
            left -= n
    wall = time.time() - t0
    out.unlink()
    return wall


def _timed(cmd: list[str], out: Path) -> tuple[float, float]:
    """(wall s, peak MB) of a command as a user runs it: its own process, which for both CLIs
    below does all the work (rdistill's in its threads when no cluster is given)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[0]} failed (exit {os.waitstatus_to_exitcode(status)}): {proc.stderr.read()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return wall, usage.ru_maxrss / 1024


def _plan_file(plan: dict, work: Path, name: str) -> Path:
    import yaml
    cfg = work / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(plan))
    return cfg


def run_mergekit(plan: dict, work: Path, name: str) -> tuple[float, float]:
    exe = Path(sys.executable).parent / "mergekit-yaml"
    out = work / f"mk_{name}"
    return _timed([str(exe), str(_plan_file(plan, work, name)), str(out), "--no-write-model-card", "--quiet"], out)


def run_cli(plan: dict, work: Path, name: str) -> tuple[float, float]:
    out = work / f"cli_{name}"
    return _timed([sys.executable, str(REPO / "jobs" / "merge.py"), str(_plan_file(plan, work, name)), str(out)], out)


def cli_table(models: dict, work: Path, methods: list[str], repeats: int) -> None:
    """The drop-in as a user sees it: `jobs/merge.py CFG OUT` against `mergekit-yaml CFG OUT`,
    alternating, whole processes timed (start-up included), medians of `repeats` each."""
    import statistics
    print("\nCLI end to end (alternating runs, medians):")
    print("| method | mergekit-yaml s | jobs/merge.py s | speed-up | mergekit peak GB | rdistill peak GB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in methods:
        plan = plans(models)[name]
        mk, rd = [], []
        for _ in range(repeats):
            mk.append(run_mergekit(plan, work, name))
            rd.append(run_cli(plan, work, name))
        mkw, rdw = statistics.median(w for w, _ in mk), statistics.median(w for w, _ in rd)
        mkp, rdp = statistics.median(p for _, p in mk), statistics.median(p for _, p in rd)
        print(f"| {name} | {mkw:.1f} | {rdw:.1f} | {mkw / rdw:.1f}x | {mkp / 1024:.2f} | {rdp / 1024:.2f} "
              f"| {rdp / mkp:.2f} |", flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/rdistill_bench_merge")
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--methods", default="linear,ties,arcee_fusion")
    ap.add_argument("--tasks", type=int, default=os.cpu_count())
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--cli-repeats", type=int, default=3, help="alternating runs of each CLI (0: skip)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = make_models(work, a.size_gb)
    size = (models["base"] / "model.safetensors").stat().st_size
    print(f"models: 4 x {size / 1e9:.2f} GB bf16 in {work} ({time.time() - t0:.0f}s to build)", flush=True)

    import ray

    from rdistill.config import RayConfig
    from rdistill.merge import merge
    from rdistill.topology import init_ray
    rows = []
    for name in a.methods.split(","):
        plan = plans(models)[name]
        fl = floor(plan, work / "floor.bin")
        mk_wall, mk_peak = run_mergekit(plan, work, name)
        t = time.time()
        init_ray(RayConfig(num_cpus=a.tasks))
        ray_start = time.time() - t
        ray.get([ray.remote(lambda: __import__("torch").__version__).options(num_cpus=1).remote()
                 for _ in range(a.tasks)])  # warm workers, as in a running pipeline
        driver0 = rss_mb()
        steps: list = []
        t = time.time()
        out = merge(plan, work / f"rd_{name}", num_tasks=a.tasks, log=lambda s: None, stats=steps)
        rd_wall = time.time() - t
        stats = steps[0]
        rd_peak = stats["sum_worker_peak_rss_mb"] + max(0.0, rss_mb() - driver0)
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
        rows.append((name, len(inputs_of(plan)), fl, mk_wall, rd_wall, mk_peak, rd_peak, ray_start))
        print(f"{name}: floor {fl:.1f}s mergekit {mk_wall:.1f}s rdistill {rd_wall:.1f}s "
              f"(ray start {ray_start:.1f}s) peak MB mergekit {mk_peak:.0f} rdistill {rd_peak:.0f}", flush=True)
    print("\n| method | inputs | floor s | mergekit s | rdistill s | speed-up | rdistill / floor "
          "| mergekit peak GB | rdistill peak GB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, fl, mk, rd, mkp, rdp, _ in rows:
        print(f"| {name} | {n} | {fl:.1f} | {mk:.1f} | {rd:.1f} | {mk / rd:.1f}x | {rd / fl:.2f}x "
              f"| {mkp / 1024:.2f} | {rdp / 1024:.2f} | {rdp / mkp:.2f} |")
    print(f"\nmodel size {size / 1e9:.2f} GB; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
          f"Ray start-up (not in rdistill s): {', '.join(f'{r[7]:.1f}s' for r in rows)}")
    if a.cli_repeats:
        cli_table(models, work, a.methods.split(","), a.cli_repeats)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
