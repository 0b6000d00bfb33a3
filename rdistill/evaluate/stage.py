"""The evaluate stage: every model of the run on each domain's test split, and the merge
candidates on the dev split to choose the run's merged model.

Each model gets one Ray Data pipeline (rows -> vLLM engine or HTTP endpoint -> the verify stage's
scorers); pipelines run concurrently as the cluster allows (topology.eval_concurrency). A model's
scored samples are kept in ctx.work as soon as it finishes, so a killed stage resumes with the
models it had not finished.

Outputs: results.json ([{model, domain, n_prompts, n_samples, pass_at_1, stderr, n_errors}],
test split), samples.parquet (every scored sample, both splits), selection.json (the chosen
merge, with every candidate's dev scores).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rdistill.evaluate.passk import aggregate, objective_score, select_candidate
from rdistill.evaluate.rows import prompt_records, sample_rows
from rdistill.evaluate.scoring import score_dataset
from rdistill.evaluate.targets import Target, eval_targets, needs_selection
from rdistill.log import log
from rdistill.rundir import write_json_atomic

# Columns kept in samples.parquet (the chat messages and verifier inputs are left out).
SAMPLE_COLUMNS = ["model", "domain", "split", "prompt_id", "sample_idx", "id", "seed", "prompt",
                  "completion", "finish_reason", "prompt_tokens", "completion_tokens", "correct",
                  "reason", "extracted", "infra", "error"]


def _slug(name: str) -> str:
    return name.replace(":", "__").replace("/", "_")


def score_model(target: Target, rows: list[dict], cfg, work: Path):
    """Generate and score one model's rows; cached in `work` (resume after a kill)."""
    import pandas as pd
    import ray

    from rdistill.generate.llm import generate
    cache = work / f"{_slug(target.name)}.parquet"
    if cache.exists():
        log.info("evaluate %s: reusing %s", target.name, cache)
        return pd.read_parquet(cache)
    t0 = time.time()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // max(cfg.eval.batch_size * 4, 1)))
    df = score_dataset(generate(ds, target.spec), cfg).to_pandas()
    df["model"] = target.name
    df = df[[c for c in SAMPLE_COLUMNS if c in df.columns]]
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, cache)
    log.info("evaluate %s: %d samples scored in %.0fs, %.3f correct", target.name, len(df),
             time.time() - t0, df["correct"].mean() if len(df) else float("nan"))
    return df


def run_at_most(n: int, jobs: list) -> list:
    """Run (fn, args) jobs in at most n daemon threads; results in job order; the first error
    is raised. Daemon threads, unlike a ThreadPoolExecutor's, never keep a Ctrl-C'd driver
    alive waiting for pipelines that ray.shutdown() has already ended."""
    import threading
    results: list = [None] * len(jobs)
    errors: list = []
    gate = threading.Semaphore(n)

    def work(i, fn, args):
        try:
            if not errors:
                results[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (re-raised in the driver thread)
            errors.append(e)
        finally:
            gate.release()

    threads = []
    for i, (fn, args) in enumerate(jobs):
        gate.acquire()
        if errors:
            break
        threads.append(threading.Thread(target=work, args=(i, fn, args), daemon=True, name=f"eval-{i}"))
        threads[-1].start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)  # short joins keep the main thread responsive to Ctrl-C
    if errors:
        raise errors[0]
    return results


def dev_selection(cfg, samples) -> dict:
    """The candidate with the best objective over the dev split's domain scores."""
    objective = cfg.merge.objective
    names = [c.name for c in cfg.merge.candidates]
    if not names:
        return {}
    if not needs_selection(cfg):
        return {"candidate": names[0], "path": f"merge/{names[0]}/final", "objective": objective,
                "scores": {}, "note": "single merge candidate: nothing to choose"}
    dev = samples[samples["split"] == "dev"]
    per: dict[str, dict] = {n: {} for n in names}
    for r in aggregate(dev):
        per[r["model"].partition(":")[2]][r["domain"]] = r["pass_at_1"]
    best = select_candidate(per, objective)
    scores = {n: {"domains": per[n], "objective": objective_score(per[n], objective)} for n in names}
    log.info("evaluate: merge candidates on dev (%s): %s -> %s", objective,
             ", ".join(f"{n}={s['objective']:.3f}" for n, s in scores.items()), best)
    return {"candidate": best, "path": f"merge/{best}/final", "objective": objective, "scores": scores}


def run(ctx) -> dict:
    import pandas as pd
    import ray

    from rdistill.topology import eval_concurrency
    cfg = ctx.cfg
    if any(d.kind == "code" for d in cfg.domains.values()):
        from rdistill.verify.sandbox_check import check_sandbox
        check_sandbox(cfg.verify.sandbox, "evaluate")
    targets = eval_targets(cfg, ctx.model)
    splits = sorted({s for t in targets for s in t.splits})
    rows = {s: [] for s in splits}
    n_prompts = {}
    for d in cfg.domains:
        for s in splits:
            recs = prompt_records(cfg, d, s, ctx.source_path)
            n_prompts[f"{d}/{s}"] = len(recs)
            rows[s] += sample_rows(cfg, d, s, recs)
    conc = eval_concurrency(cfg, ray.cluster_resources(), len(targets))
    log.info("evaluate: %d models (%s) on %s, %d at once", len(targets),
             ", ".join(t.name for t in targets), ", ".join(f"{k}: {v} prompts" for k, v in n_prompts.items()),
             conc)
    jobs = [(score_model, (t, [r for s in t.splits for r in rows[s]], cfg, ctx.work)) for t in targets]
    samples = pd.concat(run_at_most(conc, jobs), ignore_index=True)
    samples.to_parquet(ctx.out / "samples.parquet", index=False)
    results = aggregate(samples[samples["split"] == "test"])
    write_json_atomic(ctx.out / "results.json", results)
    selection = dev_selection(cfg, samples)
    if selection:
        write_json_atomic(ctx.out / "selection.json", selection)
    return {"models": len(targets), "samples": int(len(samples)), "prompts": n_prompts,
            "chosen_merge": selection.get("candidate"),
            "pass_at_1": {f"{r['model']}/{r['domain']}": r["pass_at_1"] for r in results}}
