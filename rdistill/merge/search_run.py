"""The merge search inside the merge stage: candidates merged by the streaming merge, scored on
the dev split by warm engines (one engine start per engine for the whole search, weights
reloaded between candidates), chosen by successive halving (rdistill.merge.search).

State lives in `<work>/search/`: each candidate's merged weights (removed once it is out) and its
scored dev samples, so a killed search resumes without re-merging or re-scoring what it had.
Outputs in the stage folder: `search/final` (the chosen model), `search/recipe.yaml` (its
recipe as a mergekit-style YAML with the run's models as paths, for `jobs/merge.py` or, for a
single step, `mergekit-yaml`) and `search.json` (every candidate's recipe and dev scores).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rdistill.config import SEARCH_CANDIDATE
from rdistill.log import log
from rdistill.merge.api import chain_resolver
from rdistill.merge.execute import Options, run_step
from rdistill.merge.plan import step_from_dict
from rdistill.merge.search import Candidate, candidate_space, refine, rungs, successive_halving
from rdistill.rundir import write_json_atomic

BASE = "base"  # the student base: scored too, for the floor


def check_family(models: dict[str, str]) -> None:
    """Every model the search merges has the student base's tensors and shapes: one line
    naming the odd one out, before anything is merged or an engine starts."""
    from rdistill.errors import ConfigError
    from rdistill.merge.inputs import load_input
    base = load_input("base", models["base"])
    want = {n: t.shape for n, t in base.tensors.items()}
    for ref, path in models.items():
        got = {n: t.shape for n, t in load_input(ref, path).tensors.items()}
        if got != want:
            diff = sorted(set(got) ^ set(want)) or [n for n in got if got[n] != want[n]]
            raise ConfigError(f"merge search: {ref} ({path}) differs from the student base in {diff[0]} "
                              f"({len(diff)} tensor(s)): the search merges models of one architecture")


def _dtype_of(model_dir: str) -> str:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return d if d in ("bfloat16", "float16", "float32") else "float32"


def run_search(ctx, opts: Options, resolve) -> dict:
    """Search, then put the chosen merge in ctx.out/search; returns the stage result's part."""
    import pandas as pd

    from rdistill.llm.spec import LLMSpec
    from rdistill.llm.warm import WarmPool
    from rdistill.prompts.eval_rows import prompt_records, sample_rows
    from rdistill.scoring.answers import answer_and_score
    from rdistill.scoring.passk import aggregate, objective_score
    from rdistill.topology import eval_concurrency, eval_tensor_parallel
    cfg, sc = ctx.cfg, ctx.cfg.merge.search
    domains = list(cfg.domains)
    t_start = time.time()
    check_family({ref: resolve(ref) for ref in ["base", *(f"branch:{d}" for d in domains)]})
    work = ctx.work / "search"
    work.mkdir(parents=True, exist_ok=True)
    out_dtype = _dtype_of(resolve("base"))
    cands = candidate_space(domains, sc)
    for c in cands:
        for s in c.steps:
            s["out_dtype"] = out_dtype  # toy students are fp32 on disk, R1-Distill bf16
    recs = {d: prompt_records(cfg, d, "dev", ctx.source_path) for d in domains}
    n_dev = min(len(v) for v in recs.values())
    plan = rungs(len(cands), n_dev, sc.first_prompts, sc.eta)
    log.info("merge search: %d candidates, rungs (dev prompts per domain x candidates): %s", len(cands),
             ", ".join(f"{k}x{n}" for k, n in plan))

    def merged(c: Candidate) -> str:
        """The candidate's final model, merged once (a rerun finds it done)."""
        root = work / c.name
        if not (root / "done").exists():
            done: dict[str, Path] = {}
            for s in c.steps:
                step = step_from_dict(dict(s), name=s["name"])
                dest = root / step.name
                run_step(step, dest, chain_resolver(done, resolve), opts, log.debug)
                done[step.name] = dest
            (root / "done").write_text(json.dumps(c.steps))
        return str(root / "final")

    cache: dict[str, pd.DataFrame] = {}

    def scored(name: str) -> pd.DataFrame:
        if name not in cache:
            f = work / f"{name}.parquet"
            cache[name] = pd.read_parquet(f) if f.exists() else pd.DataFrame()
        return cache[name]

    import ray
    pool = WarmPool.open(eval_concurrency(cfg, ray.cluster_resources(), len(cands)), cfg.device, cfg.eval.engine,
                         eval_tensor_parallel(cfg))
    starts = {"n": 0}

    def score(names_paths: list[tuple[str, str]], k: int) -> dict[str, dict[str, float]]:
        rows = [r for d in domains for r in sample_rows(cfg, d, "dev", recs[d][:k], n=sc.samples)]
        items = []
        for name, path in names_paths:
            have = set(scored(name)["id"]) if len(scored(name)) else set()
            todo = [r for r in rows if r["id"] not in have]
            if todo:
                items.append((LLMSpec.for_student(cfg, name, path), todo))
        for spec, df, info in answer_and_score(pool, items, cfg.verify.sandbox):
            starts["n"] += info["how"] == "started"
            df["model"] = spec.name
            keep = [c for c in ("model", "domain", "prompt_id", "id", "correct", "infra", "error") if c in df]
            cache[spec.name] = pd.concat([scored(spec.name), df[keep]], ignore_index=True)
            cache[spec.name].to_parquet(work / f"{spec.name}.parquet", index=False)
        ids = {r["id"] for r in rows}
        out = {}
        for name, _ in names_paths:
            df = scored(name)
            out[name] = {r["domain"]: r["pass_at_1"] for r in aggregate(df[df["id"].isin(ids)])}
        return out

    objective = lambda s: objective_score(s, cfg.merge.objective, cfg.merge.domain_weights)  # noqa: E731
    floor = (lambda k: score([(BASE, resolve("base"))], k)[BASE]) if sc.floor == "base" else None
    by_rung = lambda alive, k: score([(c.name, merged(c)) for c in alive], k)  # noqa: E731
    try:
        chosen = successive_halving(cands, n_dev, sc, by_rung, objective, floor)
        halved = chosen
        chosen = refine(halved, cands, n_dev, sc, by_rung, objective, floor)
        if chosen is not halved:
            log.info("merge search: refined %s (%s) to %s (%s)", halved.name, halved.label, chosen.name, chosen.label)
    finally:
        pool.close()
    dest = ctx.out / SEARCH_CANDIDATE
    shutil.copytree(work / chosen.name, dest, ignore=shutil.ignore_patterns("done"))
    for c in cands:  # only the chosen model's weights are kept; every recipe is in search.json
        shutil.rmtree(work / c.name, ignore_errors=True)
    write_recipe_yaml(chosen, resolve, dest / "recipe.yaml", opts.data_for, opts.stats)
    last = max(chosen.scores)
    base_scores = floor(last) if floor else None
    report = {"chosen": chosen.name, "label": chosen.label, "objective": cfg.merge.objective,
              "rungs": [{"dev_prompts_per_domain": k, "candidates": n} for k, n in plan],
              "base_dev": base_scores, "engine_starts": starts["n"], "seconds": round(time.time() - t_start, 1),
              "refined": [c.name for c in cands if c.refined_from is not None],
              "candidates": [{"name": c.name, "label": c.label, "steps": c.steps, "out_at_rung": c.out_at,
                              "refined_from": c.refined_from,
                              "dev": {str(k): v for k, v in c.scores.items()},
                              "objective": {str(k): round(objective(v), 6) for k, v in c.scores.items()}}
                             for c in cands]}
    write_json_atomic(ctx.out / "search.json", report)
    log.info("merge search: chose %s (%s): dev %s after %d candidates, %d engine start(s), %.0fs",
             chosen.name, chosen.label, {d: round(v, 3) for d, v in chosen.scores[last].items()}, len(cands),
             starts["n"], report["seconds"])
    return {"search": {k: report[k] for k in ("chosen", "label", "engine_starts", "seconds")},
            "search_candidates": len(cands)}


def write_recipe_yaml(c: Candidate, resolve, path: Path, data_for=None, stats=None) -> None:
    """The chosen recipe in mergekit's YAML, models as paths: one step is a mergekit config;
    a chain is a list of such steps, each later one naming an earlier one as merge:<name>.
    RegMean's models name their domain data (`data_for`) and its step the sampling (`stats`),
    which the stage otherwise supplies."""
    import dataclasses

    import yaml

    from rdistill.merge.methods import METHODS

    def data(step: dict, ref: str) -> dict:
        path = data_for(ref) if data_for and METHODS[step["merge_method"]].stats else None
        return {"data": path} if path else {}

    def plain(step: dict) -> dict:
        d = {k: v for k, v in step.items() if v not in (None, {}, [])}
        if d.get("base_model") and not d["base_model"].startswith("merge:"):
            d["base_model"] = resolve(d["base_model"])
        d["models"] = [{"model": m["model"] if m["model"].startswith("merge:") else resolve(m["model"]),
                        **({"parameters": m["parameters"]} if m.get("parameters") else {}), **data(step, m["model"])}
                       for m in step["models"]]
        if stats is not None and METHODS[step["merge_method"]].stats:
            d["stats"] = {k: v for k, v in dataclasses.asdict(stats).items() if v is not None}
        return d
    body = plain(c.steps[0]) if len(c.steps) == 1 else [plain(s) for s in c.steps]
    path.write_text(f"# rdistill merge search: {c.label}\n" + yaml.safe_dump(body, sort_keys=False))

