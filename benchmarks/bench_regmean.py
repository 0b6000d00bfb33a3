"""RegMean and RegMean++ against TIES on the same inputs: `jobs/merge.py CFG OUT` as a user runs
it (its own process, merging in its threads), wall time and peak memory, alternating, medians.

    .venv/bin/python benchmarks/bench_regmean.py [--hidden 512] [--layers 4] [--rows 64] [--repeats 2]

Builds a random Qwen2 base (float32, head_dim 64, the toy tokenizer so the models run) and three
variants (base + noise of different sizes), an SFT set per variant (the toy's arithmetic rows),
then merges the three with `ties` over the base (density 0.5), and with `regmean` and
`regmean_plusplus` (alpha 0.95): cold (statistics collected: every branch loaded and run over
its rows, then the merge) and, for RegMean, warm (statistics reused from the previous run, the
merge alone). Prints one row per method and its ratios to TIES.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from bench_merge import _plan_file, _timed  # noqa: E402


def make_world(work: Path, hidden: int, layers: int, rows: int) -> dict:
    """base, v0..v2 (float32 HF directories) and one SFT JSONL per variant."""
    from safetensors.torch import load_file, save_file

    from rdistill.toy.model import tiny_test_model
    from sft_samples import write_sft
    base = work / "base"
    if not (base / "model.safetensors").exists():
        tiny_test_model(base, seed=0, hidden_size=hidden, num_attention_heads=hidden // 64,
                        num_key_value_heads=hidden // 64, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers)
    sd = load_file(base / "model.safetensors")
    out = {"base": base, "models": [], "data": []}
    for i in range(3):
        d = work / f"v{i}"
        if not (d / "model.safetensors").exists():
            shutil.copytree(base, d, dirs_exist_ok=True)
            g = torch.Generator().manual_seed(100 + i)
            save_file({k: v + 0.002 * (1 + i) * torch.randn(v.shape, generator=g) for k, v in sd.items()},
                      d / "model.safetensors", metadata={"format": "pt"})
        out["models"].append(d)
        out["data"].append(write_sft(work / f"d{i}.jsonl", rows, seed=10 + i))
    return out


def plan(method: str, w: dict, rows: int) -> dict:
    if method == "ties":
        return {"merge_method": "ties", "base_model": str(w["base"]), "dtype": "float32",
                "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in w["models"]]}
    return {"merge_method": method, "dtype": "float32", "parameters": {"reduce_non_diagonal_ratio": 0.95},
            "stats": {"samples": rows, "max_tokens": 512},
            "models": [{"model": str(m), "data": str(d)} for m, d in zip(w["models"], w["data"])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/rdistill_bench_regmean")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=64, help="SFT rows per domain the statistics are taken on")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    w = make_world(work, a.hidden, a.layers, a.rows)
    size = (w["base"] / "model.safetensors").stat().st_size
    print(f"models: 4 x {size / 1e6:.0f} MB float32 (hidden {a.hidden}, intermediate {int(a.hidden * 2.75)}, "
          f"{a.layers} layers); {a.rows} SFT rows per domain", flush=True)
    cases = {"ties": "ties", "regmean (cold: statistics + merge)": "regmean", "regmean (warm: merge alone)": "regmean",
             "regmean_plusplus (cold)": "regmean_plusplus"}
    runs: dict[str, list] = {c: [] for c in cases}
    for r in range(a.repeats):
        for case, method in cases.items():  # alternating: the machine's load falls on every method alike
            stats = work / "stats"
            if "cold" in case:
                shutil.rmtree(stats, ignore_errors=True)
            out = work / "out"
            cmd = [sys.executable, str(REPO / "jobs" / "merge.py"), str(_plan_file(plan(method, w, a.rows), work, method)),
                   str(out), "--stats-dir", str(stats)]
            runs[case].append(_timed(cmd, out))
            print(f"  run {r + 1} {case}: {runs[case][-1][0]:.1f}s, peak {runs[case][-1][1]:.0f} MB", flush=True)
    med = {c: (statistics.median(x for x, _ in v), statistics.median(p for _, p in v)) for c, v in runs.items()}
    ref = med["ties"]
    print(f"\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, medians of {a.repeats}\n")
    print("| method | wall s | peak GB | wall / TIES | peak / TIES |")
    print("|---|---|---|---|---|")
    for c, (x, p) in med.items():
        print(f"| {c} | {x:.1f} | {p / 1024:.2f} | {x / ref[0]:.1f}x | {p / ref[1]:.2f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
