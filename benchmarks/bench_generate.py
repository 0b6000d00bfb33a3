"""Teacher generation: rdistill (Ray Data + vLLM, the generate stage's code path) against raw
`vllm.LLM.chat` and Hugging Face `model.generate` (batched, left-padded), on the toy teacher and
the toy train prompts of all three domains, same sampling settings and per-prompt seeds.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 1500] [--hf-prompts 192] [--repeats 2]

Each measurement runs in a fresh subprocess (an engine per run, nothing cached between sides), the
sides alternate, and the table reports medians. Two rates per side, in completion tokens/s:
- steady: over the generation itself (raw vLLM: the chat call; rdistill: from the first output
  block to the last, Ray Data streams them; HF: the generate calls);
- end to end: completion tokens over the whole wall time, engine start included (Ray itself is
  started once per process and not counted: a pipeline pays it once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TEACHER = str(ROOT / "rdistill" / "toy" / "assets" / "teacher")


def prompts(n: int) -> list[dict]:
    from rdistill.toy.domains import DOMAINS, records
    per = -(-n // len(DOMAINS))
    rows = [r for d in DOMAINS for r in records(d, "train", per, seed=0)][:n]
    return [{"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]}], "seed": i}
            for i, r in enumerate(rows)]


def side_rdistill(rows: list[dict], a) -> dict:
    import ray

    from rdistill.config import RayConfig, SamplingConfig
    from rdistill.llm.batch import generate
    from rdistill.llm.spec import LLMSpec
    from rdistill.topology import init_ray
    init_ray(RayConfig(num_cpus=8))
    try:
        from rdistill.config import EngineConfig
        spec = LLMSpec(model=TEACHER, name="toy-teacher", engine=EngineConfig(max_model_len=512), batch_size=a.batch_size,
                       sampling=SamplingConfig(temperature=0.6, top_p=0.95, max_tokens=a.max_tokens))
        t0 = time.time()
        arrivals = []  # (time, completion tokens) per output block
        for b in generate(ray.data.from_items(rows), spec).iter_batches(batch_size=None, batch_format="pandas"):
            arrivals.append((time.time(), int(b["completion_tokens"].sum())))
        wall = time.time() - t0
    finally:
        ray.shutdown()
    toks = sum(t for _, t in arrivals)
    steady = sum(t for _, t in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0]) if len(arrivals) > 2 else None
    return {"tokens": toks, "wall_s": wall, "steady_tok_s": steady, "blocks": len(arrivals)}


def side_vllm(rows: list[dict], a) -> dict:
    from vllm import LLM, SamplingParams
    t0 = time.time()
    # The same engine settings the generate stage uses on CPUs (see rdistill.llm.batch).
    llm = LLM(model=TEACHER, dtype="bfloat16", max_model_len=512, enforce_eager=True,
              enable_chunked_prefill=False)
    sps = [SamplingParams(temperature=0.6, top_p=0.95, max_tokens=a.max_tokens, seed=r["seed"]) for r in rows]
    t1 = time.time()
    out = llm.chat([r["messages"] for r in rows], sps, use_tqdm=False)
    t2 = time.time()
    toks = sum(len(o.outputs[0].token_ids) for o in out)
    del llm
    return {"tokens": toks, "wall_s": t2 - t0, "steady_tok_s": toks / (t2 - t1), "start_s": t1 - t0}


def side_hf(rows: list[dict], a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(TEACHER, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.bfloat16).eval()
    eos = set(model.generation_config.eos_token_id)
    t1 = time.time()
    toks = 0
    torch.manual_seed(0)
    with torch.inference_mode():
        for i in range(0, len(rows), a.hf_batch):
            texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                     for r in rows[i:i + a.hf_batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, do_sample=True, temperature=0.6, top_p=0.95, top_k=0,
                                 max_new_tokens=a.max_tokens)[:, enc["input_ids"].shape[1]:]
            for seq in gen.tolist():  # count up to and including the first end-of-turn token
                n = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
                toks += n
    t2 = time.time()
    return {"tokens": toks, "wall_s": t2 - t0, "steady_tok_s": toks / (t2 - t1)}


SIDES = {"rdistill": side_rdistill, "vllm": side_vllm, "hf": side_hf}


def run_side(side: str, a) -> dict:
    """One measurement in a fresh process; returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--side", side, "--out", f.name, "--prompts", str(a.prompts),
               "--hf-prompts", str(a.hf_prompts), "--max-tokens", str(a.max_tokens),
               "--batch-size", str(a.batch_size), "--hf-batch", str(a.hf_batch)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.loads(Path(f.name).read_text())
    print(f"  {side}: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()})}",
          flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=1500)
    ap.add_argument("--hf-prompts", type=int, default=192, help="HF generate is slow: a subset")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64, help="rdistill's rows per engine batch")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:  # a child: one measurement
        rows = prompts(a.hf_prompts if a.side == "hf" else a.prompts)
        res = SIDES[a.side](rows, a)
        res["prompts"] = len(rows)
        Path(a.out).write_text(json.dumps(res))
        return
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rep in range(a.repeats):
        print(f"repeat {rep + 1}/{a.repeats}", flush=True)
        for s in SIDES:
            runs[s].append(run_side(s, a))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("steady_tok_s", "wall_s", "tokens", "prompts")}
           for s, rs in runs.items()}
    for m in med.values():
        m["e2e_tok_s"] = m["tokens"] / m["wall_s"]
    print(f"\nGeneration, toy teacher, {a.prompts} prompts (HF: {a.hf_prompts}), max_tokens {a.max_tokens}, "
          f"T=0.6 top-p 0.95, medians of {a.repeats}, {os.cpu_count()} CPUs\n")
    print("| side | prompts | completion tokens | wall s | steady tok/s | end-to-end tok/s | rdistill / side (steady) |")
    print("|---|---|---|---|---|---|---|")
    for s, m in med.items():
        ratio = med["rdistill"]["steady_tok_s"] / m["steady_tok_s"]
        print(f"| {s} | {m['prompts']:.0f} | {m['tokens']:.0f} | {m['wall_s']:.1f} | {m['steady_tok_s']:.0f} | "
              f"{m['e2e_tok_s']:.0f} | {ratio:.2f}x |")
    print(f"\nrdistill vs raw vLLM: {med['rdistill']['steady_tok_s'] / med['vllm']['steady_tok_s']:.2f}x steady, "
          f"{med['rdistill']['e2e_tok_s'] / med['vllm']['e2e_tok_s']:.2f}x end to end (goal >= 0.8x); "
          f"vs HF generate: {med['rdistill']['steady_tok_s'] / med['hf']['steady_tok_s']:.1f}x steady (goal >= 10x)")


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    main()
