"""The evaluate stage: every model of the run on each domain's test split, and the merge
candidates on the dev split to choose the run's merged model.

Local models run on warm engines (rdistill.llm.warm): `topology.eval_concurrency` engine actors,
each started once per model family (base, branches and merges share architecture and tokenizer)
and given the next model's weights in place, so a run with ten students pays for two engine
starts, not ten; a model of another family (the teacher) gets a fresh engine. An endpoint
teacher goes through Ray Data's HTTP processor. Answers are scored by the verify stage's own
verifiers in parallel Ray Data tasks. A model's scored samples are kept in ctx.work as soon as
it finishes, so a killed stage resumes with the models it had not finished.

Outputs: results.json ([{model, domain, n_prompts, n_samples, pass_at_1, stderr, n_errors}],
test split), samples.parquet (every scored sample, both splits), selection.json (the chosen
merge, with every candidate's dev scores).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rdistill.config import to_dict
from rdistill.evaluate.targets import Target, eval_targets, needs_selection
from rdistill.log import log
from rdistill.parallel import run_at_most
from rdistill.prompts.eval_rows import domain_test_sets, prompt_records, sample_rows, samples_per_prompt
from rdistill.rundir import write_json_atomic
from rdistill.scoring.passk import aggregate, objective_score, select_candidate
from rdistill.scoring.verifiers import score_dataset
from rdistill.stage_api import Stage

# Columns kept in samples.parquet (the chat messages and verifier inputs are left out).
SAMPLE_COLUMNS = ["model", "domain", "split", "prompt_id", "sample_idx", "id", "seed", "prompt",
                  "completion", "finish_reason", "prompt_tokens", "completion_tokens", "correct",
                  "reason", "extracted", "infra", "error"]


def _slug(name: str) -> str:
    return name.replace(":", "__").replace("/", "_")


def _cache(work: Path, name: str) -> Path:
    return work / f"{_slug(name)}.parquet"


def _save(df, target: str, work: Path, t0: float):
    df["model"] = target
    df = df[[c for c in SAMPLE_COLUMNS if c in df.columns]]
    cache = _cache(work, target)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, cache)  # a killed stage resumes with the models it had finished
    log.info("evaluate %s: %d samples scored in %.0fs, %.3f correct", target, len(df),
             time.time() - t0, df["correct"].mean() if len(df) else float("nan"))
    return df


def score_model(target: Target, rows: list[dict], cfg, work: Path):
    """Generate (Ray Data: an endpoint, or a model of no shared family) and score one model."""
    import ray

    from rdistill.llm.batch import generate
    t0 = time.time()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // max(cfg.eval.batch_size * 4, 1)))
    return _save(score_dataset(generate(ds, target.spec), cfg.verify.sandbox).to_pandas(), target.name, work, t0)


def score_warm(targets: list[Target], rows: dict[str, list[dict]], cfg, work: Path, n_engines: int) -> dict:
    """Generate with warm engines (an engine per model family, weights reloaded in place between
    models) and score each model as it finishes. Returns how each model was loaded."""
    from rdistill.llm.warm import WarmPool
    from rdistill.scoring.answers import answer_and_score
    from rdistill.topology import eval_tensor_parallel
    how: dict[str, str] = {}
    if not targets:
        return {"engine_starts": 0, "weight_reloads": 0, "how": how}
    t0 = time.time()
    items = [(t.spec, [r for split in t.splits for r in rows[split]]) for t in targets]
    with WarmPool.open(min(n_engines, len(targets)), cfg.device, cfg.eval.engine, eval_tensor_parallel(cfg),
                       cold=not cfg.eval.warm_engines) as pool:
        for spec, df, info in answer_and_score(pool, items, cfg.verify.sandbox):
            how[spec.name] = info["how"]
            log.info("evaluate %s: %s engine (%.1fs), %d answers in %.1fs", spec.name, info["how"],
                     info["load_s"], len(df), info["gen_s"])
            _save(df, spec.name, work, t0)
            t0 = time.time()
    return {"engine_starts": sum(v == "started" for v in how.values()),
            "weight_reloads": sum(v == "reloaded" for v in how.values()), "how": how}


def dev_selection(cfg, samples) -> dict:
    """The candidate with the best objective over the dev split's domain scores."""
    objective, weights = cfg.merge.objective, cfg.merge.domain_weights
    names = cfg.merge.names()
    if not names:
        return {}
    if not needs_selection(cfg):
        return {"candidate": names[0], "path": f"merge/{names[0]}/final", "objective": objective,
                "scores": {}, "note": "single merge candidate: nothing to choose"}
    dev = samples[samples["split"] == "dev"]
    per: dict[str, dict] = {n: {} for n in names}
    for r in aggregate(dev):
        per[r["model"].partition(":")[2]][r["domain"]] = r["pass_at_1"]
    best = select_candidate(per, objective, weights)
    scores = {n: {"domains": per[n], "objective": objective_score(per[n], objective, weights)} for n in names}
    log.info("evaluate: merge candidates on dev (%s): %s -> %s", objective,
             ", ".join(f"{n}={s['objective']:.3f}" for n, s in scores.items()), best)
    return {"candidate": best, "path": f"merge/{best}/final", "objective": objective, "scores": scores}


def run(ctx) -> dict:
    import pandas as pd
    import ray

    from rdistill.topology import eval_concurrency
    cfg = ctx.cfg
    if any(d.kind == "code" for d in cfg.domains.values()):
        from rdistill.scoring.sandbox_check import check_sandbox
        check_sandbox(cfg.verify.sandbox, "evaluate")
    targets = eval_targets(cfg, ctx.model)
    splits = sorted({s for t in targets for s in t.splits})
    rows = {s: [] for s in splits}
    n_prompts = {}
    for d, dom in cfg.domains.items():
        for s in splits:
            # test: the domain's test set and its named extra ones (math/aime25, math/math500),
            # each reported as a column of its own; dev: the one dev set
            sets = domain_test_sets(dom, d) if s == "test" else [(d, None)]
            for name, src in sets:
                recs = prompt_records(cfg, d, s, ctx.source_path, source=src)
                n_prompts[f"{name}/{s}"] = len(recs)
                rows[s] += sample_rows(cfg, d, s, recs, n=samples_per_prompt(cfg, d, src), name=name)
    conc = eval_concurrency(cfg, ray.cluster_resources(), len(targets))
    log.info("evaluate: %d models (%s) on %s, %d engine(s) at once", len(targets),
             ", ".join(t.name for t in targets), ", ".join(f"{k}: {v} prompts" for k, v in n_prompts.items()),
             conc)
    todo = [t for t in targets if not _cache(ctx.work, t.name).exists()]
    if len(todo) < len(targets):
        log.info("evaluate: reusing the samples of %d model(s) finished before", len(targets) - len(todo))
    engines = score_warm([t for t in todo if t.spec.backend == "vllm"], rows, cfg, ctx.work, conc)
    run_at_most(conc, [lambda t=t: score_model(t, [r for s in t.splits for r in rows[s]], cfg, ctx.work)
                       for t in todo if t.spec.backend != "vllm"], name="eval")
    samples = pd.concat([pd.read_parquet(_cache(ctx.work, t.name)) for t in targets], ignore_index=True)
    samples.to_parquet(ctx.out / "samples.parquet", index=False)
    results = aggregate(samples[samples["split"] == "test"])
    write_json_atomic(ctx.out / "results.json", results)
    selection = dev_selection(cfg, samples)
    if selection:
        write_json_atomic(ctx.out / "selection.json", selection)
    return {"models": len(targets), "samples": int(len(samples)), "prompts": n_prompts,
            "engine_starts": engines["engine_starts"], "weight_reloads": engines["weight_reloads"],
            "chosen_merge": selection.get("candidate"),
            "pass_at_1": {f"{r['model']}/{r['domain']}": r["pass_at_1"] for r in results}}


# Every model of the run on dev/test; the teacher too when it is evaluated.
STAGE = Stage("evaluate", run, reads=("eval", "student", "merge", "device", "verify"),
              inputs=lambda c: ["train", "merge"] + (["distill"] if "distill" in c.stages else []),
              engine="eval.engine", warm=True,
              domains_ignored=("train", "extra_train", "require_correct", "train_overrides"),
              extra=lambda c: {"teacher": to_dict(c.teacher) if c.eval.include_teacher else None,
                               "mixture": c.train.mixture_baseline})
