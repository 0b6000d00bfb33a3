"""The train stage: one branch student per domain, each fine-tuned from the same student base on
its domain's verified SFT set (<run_dir>/verify/<domain>.jsonl).

Every branch is checked and tokenized first, so a bad set fails before any training starts. The
branches' TorchTrainer.fit() calls then run from threads: each asks Ray for its workers'
declared resources (topology.train_scaling), so they train side by side when the cluster has
room and queue one after another when it does not. Checkpoints live in <run_dir>/.work/train,
so rerunning the stage after a crash continues each branch from its last checkpoint.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rdistill.config import branch_train_config
from rdistill.log import log
from rdistill.pipeline import StageContext
from rdistill.topology import init_ray
from rdistill.train.sft import fit_sft, prepare_sft


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    base = ctx.model(cfg.student.base)
    jobs = {}
    for dom in sorted(cfg.domains):
        sft = ctx.run.stage_dir("verify") / f"{dom}.jsonl"
        jobs[dom] = prepare_sft(base, [str(sft)], str(ctx.out / dom), branch_train_config(cfg, dom),
                                device=cfg.device, name=f"branch-{dom}", storage_dir=str(ctx.work / dom))
    init_ray(cfg.ray)
    log.info("train: %d branch(es) from %s: %s", len(jobs), base,
             ", ".join(f"{d} ({j.data['kept']} samples, {j.total_steps} steps)" for d, j in jobs.items()))
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="branch") as pool:
        futures = {dom: pool.submit(fit_sft, job) for dom, job in jobs.items()}
        errors, results = {}, {}
        for dom, fut in futures.items():
            try:
                results[dom] = fut.result()
            except Exception as e:  # let the other branches finish (their checkpoints stay)
                errors[dom] = e
    if errors:
        dom, err = next(iter(errors.items()))
        raise RuntimeError(f"branch {dom} failed ({type(err).__name__}: {err}); rerun the stage to "
                           "continue from its last checkpoint") from err
    out: dict = {"branches": len(results), "models": {d: f"train/{d}" for d in results}}
    for dom, m in results.items():
        out[f"{dom}_final_loss"] = round(m["final_loss"], 4)
        out[f"{dom}_tokens_per_s"] = m["tokens_per_s"]
    out["per_branch"] = results
    return out
