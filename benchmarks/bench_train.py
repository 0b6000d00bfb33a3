"""Branch training: neat packing vs padded batches, and Ray Train + DeepSpeed vs a plain loop.

    .venv/bin/python benchmarks/bench_train.py [--model DIR] [--samples 256] [--zero 2] [--max-len 512]

Trains the same SFT set twice through `rdistill.train.sft.train_sft` (one epoch each, same micro
batch), once packed and once one sample per row, and prints real (non-pad) tokens/s over the
training steps, the measured padding share, steps and wall time. The SFT set mimics verified
reasoning traces: arithmetic chains whose step counts are log-normal (median 6, up to 60), so
most samples are short and a few are many times longer, as R1 traces are.
Without --model a random tiny Qwen2 is built (rdistill.toy.model.tiny_test_model).

Then the framework's overhead: the same packed rows trained for --steps steps by
`train_sft` on one Ray Train worker (DeepSpeed ZeRO-2, 1 CPU) and by a plain PyTorch loop in this
process (torch AdamW, same model, batches, forward and loss, 1 thread like the worker), alternating
--repeats times; the ratio of median step times (warm-up steps excluded).

First, the loss over a 152k vocabulary (Qwen's): peak memory and time of one forward+backward
for each of --loss-tokens (default 4096 and 8192 tokens), with the full [tokens, vocab] logits
(train.loss_chunk_tokens=0) and with the chunked loss at each of --loss-chunks, side by side as a
markdown table (goal: memory >= 5x lower, time within 1.2x). Each variant runs in a fresh process
(peak RSS over the RSS before the first pass on CPUs, max_memory_allocated on GPUs); its time is
the median of --loss-repeats passes. `--loss-only` (or the older `--loss-memory-only`) stops after it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_traces(path: Path, n: int, seed: int = 0, max_terms: int = 60) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            # Reasoning-trace lengths are long-tailed (most short, a few many times longer):
            # log-normal step counts, median 6, clipped to what fits max_len.
            n_terms = min(max_terms, max(2, int(rng.lognormvariate(math.log(6), 0.9))))
            terms = [rng.randint(1, 9) for _ in range(n_terms)]
            steps, acc = [], 0
            for t in terms:
                steps.append(f"{acc}+{t}={acc + t}")
                acc += t
            q = "What is " + "+".join(map(str, terms)) + "?"
            a = "<think>" + " ; ".join(steps) + f"</think> The answer is \\boxed{{{acc}}}."
            f.write(json.dumps({"id": str(i), "messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": a}]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60, help="steps per overhead run")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the step-time median")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loss-tokens", default="4096,8192", help="token counts of the loss line")
    ap.add_argument("--loss-chunks", default="512,4096", help="chunk sizes of the loss line")
    ap.add_argument("--loss-repeats", type=int, default=3, help="timed passes per loss variant (median)")
    ap.add_argument("--loss-only", "--loss-memory-only", dest="loss_memory_only", action="store_true",
                    help="stop after the loss line")
    args = ap.parse_args()

    loss_table([int(x) for x in args.loss_tokens.split(",")], [int(x) for x in args.loss_chunks.split(",")],
               args.loss_repeats)
    if args.loss_memory_only:
        return

    import ray

    from rdistill.config import RayConfig, TrainConfig
    from rdistill.log import setup
    from rdistill.topology import init_ray
    from rdistill.train.sft import train_sft
    setup()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model = args.model
    if model is None:
        from rdistill.toy.model import tiny_test_model
        model = str(tiny_test_model(tmp / "base"))
    sft = tmp / "sft.jsonl"
    write_traces(sft, args.samples)
    init_ray(RayConfig(num_cpus=8))
    rows, overhead = [], []
    try:
        for packing in (True, False):
            cfg = TrainConfig(num_workers=2, zero_stage=args.zero, precision="fp32", epochs=1, lr=1e-3,
                              micro_batch_size=args.micro_batch, max_len=args.max_len, packing=packing,
                              checkpoint_every=10 ** 6)
            m = train_sft(model, [str(sft)], str(tmp / f"out-{packing}"), cfg, name=f"bench-{packing}",
                          storage_dir=str(tmp / "store"))
            rows.append({"packing": packing, "samples": m["kept"], "rows": m["rows"], "steps": m["steps"],
                         "tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"],
                         "padding_share": m["padding_share"], "train_time_s": m["train_time_s"],
                         "wall_s": m["wall_s"], "final_loss": round(m["final_loss"], 4)})
        cfg = TrainConfig(num_workers=1, zero_stage=args.zero, precision="fp32", max_steps=args.steps, lr=1e-3,
                          micro_batch_size=args.micro_batch, max_len=args.max_len, packing=True,
                          checkpoint_every=10 ** 6)
        for rep in range(args.repeats):
            name = f"overhead-{rep}"
            train_sft(model, [str(sft)], str(tmp / name), cfg, name=name, storage_dir=str(tmp / "store"))
            prog = [json.loads(l) for l in (tmp / "store" / f"{name}-progress.jsonl").read_text().splitlines()]
            ray_t = statistics.median(r["step_time_s"] for r in prog[args.warmup:])
            plain_t = statistics.median(plain_loop(model, tmp / "store" / f"{name}-rows", cfg)[args.warmup:])
            overhead.append({"ray_step_s": ray_t, "plain_step_s": plain_t})
            print(f"overhead repeat {rep + 1}: Ray Train + DeepSpeed {ray_t * 1e3:.1f} ms/step, "
                  f"plain loop {plain_t * 1e3:.1f} ms/step", flush=True)
    finally:
        ray.shutdown()
    print(json.dumps({"packing": rows, "overhead": overhead}, indent=1))
    print("\n| packing | samples | rows | steps | tokens/s | padding share | train s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['packing']} | {r['samples']} | {r['rows']} | {r['steps']} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['padding_share']:.1f}% | {r['train_time_s']:.1f} | {r['wall_s']:.0f} |")
    useful = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"\npacked / unpacked useful tokens/s: {useful:.2f}x (goal >= 2x); padding "
          f"{100 * rows[0]['padding_share']:.1f}% vs {100 * rows[1]['padding_share']:.1f}% (goal < 5% packed)")
    r_med = statistics.median(o["ray_step_s"] for o in overhead)
    p_med = statistics.median(o["plain_step_s"] for o in overhead)
    print(f"\n| trainer | ms/step (median of {args.repeats} runs x {args.steps - args.warmup} steps) |")
    print("|---|---|")
    print(f"| Ray Train + DeepSpeed ZeRO-{args.zero}, 1 worker | {r_med * 1e3:.1f} |")
    print(f"| plain PyTorch loop | {p_med * 1e3:.1f} |")
    print(f"\noverhead per step: {r_med / p_med:.2f}x (goal <= 1.3x)")


VOCAB, LOSS_HIDDEN = 151936, 256  # Qwen2's vocabulary; a small hidden size keeps the model cheap


def loss_table(tokens: list[int], chunks: list[int], repeats: int) -> list[dict]:
    """Peak memory and time of the full-logits loss vs the chunked loss, one row per (tokens, chunk)."""
    rows = []
    for n in tokens:
        full = loss_peak_memory(n, 0, repeats)
        for c in chunks:
            ch = loss_peak_memory(n, c, repeats)
            rows.append({"tokens": n, "chunk": c, "full_bytes": full["peak"], "chunked_bytes": ch["peak"],
                         "full_s": full["s"], "chunked_s": ch["s"]})
    print(f"\nloss forward+backward, vocab {VOCAB}, hidden {LOSS_HIDDEN}, fp32, median of {repeats} passes, "
          "each variant in a fresh process\n")
    print("| tokens | chunk | full GiB | chunked GiB | memory ratio | full s | chunked s | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['chunk']} | {r['full_bytes'] / 2**30:.2f} | {r['chunked_bytes'] / 2**30:.2f} | "
              f"{r['full_bytes'] / max(1, r['chunked_bytes']):.1f}x | {r['full_s']:.2f} | {r['chunked_s']:.2f} | "
              f"{r['chunked_s'] / r['full_s']:.2f}x |")
    print("\ngoal: memory ratio >= 5x, time ratio (chunked / full) <= 1.2x", flush=True)
    return rows


def loss_peak_memory(tokens: int, chunk: int, repeats: int = 1) -> dict:
    """{"peak": bytes, "s": median seconds} of loss forward+backward (chunk 0: full logits),
    in a fresh process so that one variant's peak never hides another's."""
    import multiprocessing as mp
    import queue
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loss_peak_child, args=(tokens, chunk, repeats, q))
    p.start()
    while True:  # fail instead of waiting forever when the child dies (out of memory) without a result
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"loss benchmark child ({tokens} tokens, chunk {chunk}) died, exit code "
                                   f"{p.exitcode}: out of memory? see its traceback above") from None
    p.join()
    return out


def _rss() -> int:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _loss_peak_child(tokens: int, chunk: int, repeats: int, q) -> None:
    import resource
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rdistill.train.forward import token_losses
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=LOSS_HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=False,
                      max_position_embeddings=max(tokens, 1024), attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to("cuda" if gpu else "cpu")
    ids = torch.randint(0, VOCAB, (1, tokens))
    batch = {"input_ids": ids, "position_ids": torch.arange(tokens)[None], "targets": ids.roll(-1, 1)}
    # Gradients exist from the first pass on: allocate them now so the base already holds them
    # and the peak is the loss's own (the same for both variants either way).
    for prm in model.parameters():
        prm.grad = torch.zeros_like(prm)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        token_losses(model, batch, chunk).sum().backward()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if gpu:
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is the high-water mark of the whole process, hence a fresh one per variant
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    q.put({"peak": peak, "s": statistics.median(times)})


def plain_loop(model_dir: str, data_file: Path, cfg) -> list[float]:
    """Step times of a plain PyTorch loop over the same packed rows, in the same step order."""
    import torch
    from transformers import AutoModelForCausalLM

    from rdistill.data.packing import PackedRows, step_rows
    from rdistill.data.sft import IGNORE
    from rdistill.train.forward import token_losses
    torch.set_num_threads(int(cfg.cpus_per_worker))  # what the Ray Train worker gets
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    rows = PackedRows(data_file)
    pad = model.config.pad_token_id or 0
    times = []
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        b = rows.batch(step_rows(len(rows), step, cfg.micro_batch_size, cfg.seed), pad)
        tl = token_losses(model, b)
        (tl.sum() / (b["targets"] != IGNORE).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    main()
