"""Pass@1 of toy models on the toy test split, sampled through vLLM and judged by the project's
verifiers (the same ones the verify and evaluate stages use).

    python -m rdistill.toy.measure MODEL_DIR [MODEL_DIR ...] [--n-test 100] [--samples 1]

One engine for all the models (the toy's share a family: each next model's weights are loaded
into it in place, rdistill.llm.warm, which answers as a fresh engine would); vLLM's CPU backend
takes ~30 s to start. vLLM spawns worker processes, so this runs as a script (or in a
subprocess), never on import.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from rdistill.toy.domains import DOMAINS, records


def pass_at_1(engine, model_dir: str, recs: dict[str, list[dict]], samples: int = 1, temperature: float = 0.6,
              top_p: float = 0.95, max_tokens: int = 128, seed: int = 0) -> dict:
    """{domain: {"pass@1", "format", "n"}} for one model on `engine` (a rdistill.llm.warm.WarmEngine
    used in this process); `format` is the share of completions that close </think> and stop on
    their own (the R1 format, whatever the answer)."""
    from vllm import SamplingParams

    from rdistill.config import EngineConfig
    from rdistill.llm.warm import engine_kwargs
    from rdistill.scoring.verifiers import score
    t0 = time.time()
    how = engine.load(model_dir, engine_kwargs("cpu", EngineConfig(dtype="bfloat16", max_model_len=512), seed))
    out: dict = {"load_s": round(time.time() - t0, 1), "engine": how}
    sp = SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    for d, rs in recs.items():
        msgs = [[{"role": "user", "content": r["prompt"]}] for r in rs]
        res = engine.llm.chat(msgs, sp, use_tqdm=False)
        ok = fmt = total = 0
        for r, o in zip(rs, res):
            for c in o.outputs:
                total += 1
                ok += score(d, c.text, r).correct
                fmt += c.finish_reason == "stop" and "</think>" in c.text
        out[d] = {"pass@1": round(ok / total, 4), "format": round(fmt / total, 4), "n": total,
                  "example": res[0].outputs[0].text[:200]}
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="pass@1 of toy models on the toy test split, through vLLM")
    p.add_argument("models", nargs="+")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="toy seed of the test records")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    recs = {d: records(d, "test", a.n_test, a.seed) for d in DOMAINS}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from rdistill.llm.warm import WarmEngine
    engine = WarmEngine()
    try:
        results = {m: pass_at_1(engine, m, recs, samples=a.samples) for m in a.models}
    finally:
        engine.shutdown()
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
