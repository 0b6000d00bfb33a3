"""Branch-training throughput and padding, with and without neat packing (CPU, 2 DeepSpeed workers).

    .venv/bin/python benchmarks/bench_train.py [--model DIR] [--samples 256] [--zero 2] [--max-len 512]

Trains the same SFT set twice through `rdistill.train.sft.train_sft` (one epoch each, same micro
batch), once packed and once one sample per row, and prints real (non-pad) tokens/s over the
training steps, the measured padding share, steps and wall time. The SFT set mimics verified
reasoning traces: arithmetic chains of random length, so sample lengths vary several-fold.
Without --model a random tiny Qwen2 is built (rdistill.toy.model.tiny_test_model).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_traces(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            terms = [rng.randint(1, 9) for _ in range(rng.randint(2, 24))]
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
    args = ap.parse_args()

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
    rows = []
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
    finally:
        ray.shutdown()
    print(json.dumps(rows, indent=1))
    print("\n| packing | samples | rows | steps | tokens/s | padding share | train s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['packing']} | {r['samples']} | {r['rows']} | {r['steps']} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['padding_share']:.1f}% | {r['train_time_s']:.1f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
