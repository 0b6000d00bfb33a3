"""On a CUDA machine, the GPU parts that need neither Ray, vLLM nor DeepSpeed, measured side by side:

1. The chunked LM-head cross-entropy (rdistill.train.chunked_loss) against full logits at the
   reference recipe's shapes (Qwen2.5-32B: hidden 5120, vocabulary 152,064; 16k tokens):
   loss and gradients compared, peak GPU memory and time of forward + backward.
2. The streaming merge with `device=gpu` against `device=cpu` on the same inputs (random
   Qwen2-shaped models, benchmarks/bench_merge.py): outputs compared tensor by tensor, wall times.

    python benchmarks/bench_gpu.py [--tokens 16384] [--size-gb 0.4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402


def _pass(kind: str, h0, w0, t, chunk: int):
    from rdistill.train.chunked_loss import ChunkedLinearCE
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if kind == "full":  # what the model's own loss does: bf16 logits, an fp32 copy, cross-entropy
        loss = torch.nn.functional.cross_entropy((h @ w.t()).float(), t, reduction="sum")
    else:
        loss = ChunkedLinearCE.apply(h, w, t, chunk).sum()
    loss.backward()
    torch.cuda.synchronize()
    return {"loss": loss.item(), "seconds": time.perf_counter() - t0,
            "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2 ** 30}, h.grad.float(), w.grad.float()


def chunked_ce(tokens: int, hidden: int, vocab: int, chunks: list[int]) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    w0 = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    t = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    out = {"tokens": tokens, "hidden": hidden, "vocab": vocab}
    _pass("full", h0[:256], w0, t[:256], 0)  # warm-up: cuBLAS handles, allocator
    ref, gh, gw = _pass("full", h0, w0, t, 0)
    out["full"] = ref
    for c in chunks:
        _pass("chunked", h0[:256], w0, t[:256], c)
        r, ch, cw = _pass("chunked", h0, w0, t, c)
        r["loss_rel_diff"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
        r["grad_h_rel_max"] = ((ch - gh).abs().max() / gh.abs().max()).item()
        r["grad_w_rel_max"] = ((cw - gw).abs().max() / gw.abs().max()).item()
        out[f"chunk_{c}"] = r
        del ch, cw
    return out


def _compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file
    x = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    y = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert x.keys() == y.keys(), "different tensors"
    n = differ = 0
    worst = 0.0
    for k in x:
        d = (x[k].float() - y[k].float()).abs()
        n += d.numel()
        differ += int((d > 0).sum())
        worst = max(worst, float(d.max()))
    return {"elements": n, "share_differing": differ / n, "max_abs_diff": worst}


def merge_gpu_vs_cpu(size_gb: float, work: Path) -> dict:
    from bench_merge import make_models, plans

    from rdistill.merge.api import merge
    models = make_models(work / "models", size_gb)
    ps = plans(models)
    s = {k: str(v) for k, v in models.items()}
    ps["task_arithmetic"] = {"merge_method": "task_arithmetic", "base_model": s["base"], "dtype": "float32",
                             "out_dtype": "bfloat16", "models": [{"model": s[v], "parameters": {"weight": 0.7}}
                                                                 for v in ("v0", "v1", "v2")]}
    ps["dare_ties"] = {"merge_method": "dare_ties", "base_model": s["base"], "dtype": "bfloat16",
                       "models": [{"model": s[v], "parameters": {"weight": 1.0, "density": 0.5}}
                                  for v in ("v0", "v1", "v2")]}
    out = {"size_gb": size_gb}
    for name, plan in ps.items():
        row = {}
        for key, dev in (("cpu_s", "cpu"), ("gpu_first_s", "gpu"), ("gpu_s", "gpu")):  # CUDA set up once
            t0 = time.perf_counter()
            merge(plan, work / f"{name}-{dev}", device=dev, log=lambda *a: None)
            row[key] = round(time.perf_counter() - t0, 2)
        row.update(_compare(work / f"{name}-cpu", work / f"{name}-gpu"))
        out[name] = row
        print(name, json.dumps(row), flush=True)
        for dev in ("cpu", "gpu"):
            shutil.rmtree(work / f"{name}-{dev}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--chunks", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--size-gb", type=float, default=0.4)
    ap.add_argument("--out")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here: run it on a GPU machine", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    res["chunked_ce"] = chunked_ce(a.tokens, a.hidden, a.vocab, a.chunks)
    print("chunked_ce", json.dumps(res["chunked_ce"], indent=1), flush=True)
    torch.cuda.empty_cache()
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        res["merge"] = merge_gpu_vs_cpu(a.size_gb, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
