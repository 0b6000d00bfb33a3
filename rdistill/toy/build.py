"""Build the toy world's teacher and student base from scratch, through the project's own SFT
training code (`rdistill.train.sft.train_sft`, Ray Train + DeepSpeed), cached by a hash of the recipe.

    python -m rdistill.toy.build --out DIR [--seed 0] [--teacher-steps N] [--base-steps N]

Steps: generate correct reasoning traces of the three domains (training split only), train a
byte-level BPE tokenizer on them, initialise a tiny Qwen2 (head_dim 64), then fine-tune it on the
traces to near-perfect answers: the teacher. Then the student base: the teacher's model trained
on briefly on traces with slips (RECIPE["base"]), a generalist with partial skill in every
domain, as DeepSeek-R1-Distill-Qwen-32B is beside DeepSeek-R1, so that branches refine skills it
already has instead of learning them from zero (a base that only knew the format made every
merge score ~0: each branch rewrote shared weights to learn its whole skill; an intermediate
checkpoint of the teacher's run was no better a base: its skills appear abruptly, one domain
after another, in a different order from one run to the next). Building takes about 22 minutes
on 2 cores, so the package ships built models (rdistill/toy/assets, built by exactly this
RECIPE) and the toy stage only calls this on `toy.rebuild=true` or a seed other than the
shipped one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

from rdistill.rundir import stable_hash, write_json_atomic
from rdistill.toy.domains import DOMAINS, traces
from rdistill.toy.model import DEFAULT_SHAPE

ASSETS = Path(__file__).resolve().parent / "assets"
CACHE = Path(os.environ.get("RDISTILL_CACHE", "~/.cache/rdistill")).expanduser() / "toy"

# The recipe of the shipped models; `assets/recipe.json` records the one they were built with.
RECIPE: dict = {
    "seed": 0,
    "traces_per_domain": 15000,
    # Science (compare four converted quantities two at a time) is the slowest skill to learn:
    # it gets this many times the traces of the others, so a larger share of every batch.
    "trace_weights": {"science": 2},
    "tokenizer_corpus_every": 10,  # the tokenizer is trained on every 10th trace
    "vocab_size": 512,
    "max_len": 512,
    "shape": dict(DEFAULT_SHAPE),
    # Fine-tuning (TrainConfig fields). Batches of ~32 traces: packed rows of 256 tokens hold ~3.
    "train": {"num_workers": 1, "zero_stage": 0, "precision": "fp32", "lr": 3e-3, "warmup_ratio": 0.025,
              "scheduler": "cosine", "micro_batch_size": 10, "grad_accum": 1, "max_len": 256,
              "packing": True, "adam_beta2": 0.95, "weight_decay": 0.01, "grad_clip": 1.0,
              "checkpoint_every": 500},
    "teacher_steps": 3000,
    # The student base: the teacher's model trained on, briefly, on traces of which a share per
    # domain carries one slip to a wrong answer (a digit sum off by one, a wrong constant, a
    # comparison the wrong way round). It keeps every domain's procedure but gets about half the
    # answers wrong, so branches refine a generalist (unlearn one domain's slips) instead of
    # learning a skill from zero; their changes stay small and add up in a merge. Sampling at
    # T=0.6 sharpens towards the most common continuation, so the slip shares sit well above
    # the error rates they produce.
    "base": {"steps": 300, "lr": 1e-3, "warmup_ratio": 0.05,
             "slip_rates": {"math": 0.91, "code": 0.92, "science": 0.83}},
}


def recipe_for(seed: int | None = None, **overrides) -> dict:
    r = copy.deepcopy(RECIPE)
    if seed is not None:
        r["seed"] = seed
    r.update({k: v for k, v in overrides.items() if v is not None})
    return r


def recipe_hash(recipe: dict) -> str:
    return stable_hash(recipe)


def write_traces(recipe: dict, out: Path, seed: int | None = None, slip_rates: dict | None = None) -> list[Path]:
    """One SFT JSONL per domain with traces of training-split problems (a stream separate from the
    prompt records: seed + 1 by default), correct, or with a domain's share of slips."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for d in DOMAINS:
        path = out / f"{d}.jsonl"
        n = recipe["traces_per_domain"] * recipe.get("trace_weights", {}).get(d, 1)
        rows = traces(d, n, recipe["seed"] + 1 if seed is None else seed, (slip_rates or {}).get(d, 0.0))
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    return files


def build_tokenizer(recipe: dict, trace_files: list[Path]):
    from rdistill.toy.tokenizer import train_tokenizer
    corpus = []
    for f in trace_files:
        for i, line in enumerate(f.read_text().splitlines()):
            if i % recipe["tokenizer_corpus_every"] == 0:
                m = json.loads(line)["messages"]
                corpus.append(m[0]["content"] + " " + m[1]["content"])
    return train_tokenizer(corpus, vocab_size=recipe["vocab_size"])


def build(out_dir: str | Path, recipe: dict | None = None) -> dict:
    """Build teacher and base into `out_dir`/{teacher,base} with `recipe.json`; returns its info.
    Resumable: a rerun continues the Ray Train runs from their last checkpoints."""
    from rdistill.config import TrainConfig
    from rdistill.toy.model import init_model
    from rdistill.train.sft import train_sft
    recipe = recipe or recipe_for()
    out = Path(out_dir).absolute()
    work = out / ".work"
    t0 = time.time()
    files = write_traces(recipe, work / "traces")
    tok = build_tokenizer(recipe, files)
    init = init_model(tok, work / "init", seed=recipe["seed"], max_len=recipe["max_len"], **recipe["shape"])
    info: dict = {"recipe": recipe, "hash": recipe_hash(recipe), "trainer": "rdistill.train.sft.train_sft"}
    cfg = TrainConfig(**recipe["train"], max_steps=recipe["teacher_steps"], seed=recipe["seed"])
    m = train_sft(str(init), [str(f) for f in files], str(out / "teacher"), cfg, device="cpu",
                  name="toy-teacher", storage_dir=str(work / "ray"))
    (out / "teacher" / "metrics.jsonl").unlink(missing_ok=True)
    info["teacher"] = {"steps": m["steps"], "final_loss": m["final_loss"], "build_s": round(time.time() - t0, 1)}
    info["base"] = build_base(out / "teacher", out / "base", recipe, work)
    info["params"] = count_params(out / "teacher")
    info["build_s"] = round(time.time() - t0, 1)
    write_json_atomic(out / "recipe.json", info)
    shutil.rmtree(work, ignore_errors=True)
    return info


def build_base(teacher: Path, out: Path, recipe: dict, work: Path) -> dict:
    """The student base from a built teacher: trained on briefly on slipped traces."""
    from rdistill.config import TrainConfig
    from rdistill.train.sft import train_sft
    t = time.time()
    b = recipe["base"]
    slipped = write_traces(recipe, work / "slipped", seed=recipe["seed"] + 2, slip_rates=b["slip_rates"])
    cfg = TrainConfig(**{**recipe["train"], "lr": b["lr"], "warmup_ratio": b["warmup_ratio"]},
                      max_steps=b["steps"], seed=recipe["seed"] + 2)
    m = train_sft(str(teacher), [str(f) for f in slipped], str(out), cfg, device="cpu", name="toy-base",
                  storage_dir=str(work / "ray"))
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return {"steps": m["steps"], "final_loss": m["final_loss"], "build_s": round(time.time() - t, 1)}


def count_params(model_dir: str | Path) -> int:
    from safetensors import safe_open
    n = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(st.get_tensor(k).numel() for k in st.keys())
    return n


def shipped_recipe() -> dict:
    """What the shipped models in rdistill/toy/assets were built with."""
    return json.loads((ASSETS / "recipe.json").read_text())


def cached_build(recipe: dict, cache: Path = CACHE) -> Path:
    """The built models of `recipe`, built once under <cache>/<hash> (a rerun reuses them)."""
    d = cache / recipe_hash(recipe)
    if not (d / "recipe.json").exists():
        build(d, recipe)
    return d


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder that receives teacher/, base/ and recipe.json")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--traces-per-domain", type=int, default=None)
    a = p.parse_args(argv)
    recipe = recipe_for(a.seed, teacher_steps=a.teacher_steps, traces_per_domain=a.traces_per_domain)
    info = build(a.out, recipe)
    print(json.dumps({k: v for k, v in info.items() if k != "recipe"}, indent=2))


if __name__ == "__main__":
    main()
