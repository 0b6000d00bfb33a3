"""The train stage: one branch student per domain, each fine-tuned from the same student base on
its domain's verified SFT set (<run_dir>/verify/<domain>.jsonl).

Every branch is checked and tokenized first, so a bad set fails before any training starts. The
branches' TorchTrainer.fit() calls then run from threads: each asks Ray for its workers'
declared resources (topology.train_scaling), so they train side by side when the cluster has
room and queue one after another when it does not. Checkpoints live in <run_dir>/.work/train,
so rerunning the stage after a crash continues each branch from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from rdistill import tracking
from rdistill.config import branch_train_config, to_dict
from rdistill.log import log
from rdistill.parallel import run_at_most
from rdistill.stage_api import Stage, StageContext
from rdistill.topology import init_ray, train_concurrency
from rdistill.refs import MIXTURE
from rdistill.train import budget
from rdistill.train.progress import TrainProgress
from rdistill.train.sft import fit_sft, prepare_sft


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    base = ctx.model(cfg.student.base)
    init_ray(cfg.ray)  # before preparing: tokenizing a large SFT set runs as a Ray Data job
    jobs, reused, keys, tcfg = {}, {}, {}, {}
    sets = {dom: str(ctx.run.stage_dir("verify") / f"{dom}.jsonl") for dom in sorted(cfg.domains)}
    # offline logit KD (train.kd.weight > 0): the teacher's top-k logprobs captured into the rows
    kd = ctx.model(cfg.train.kd.teacher or cfg.teacher.model) if cfg.train.kd.weight > 0 else None
    for dom, sft in sets.items():
        tcfg[dom] = branch_train_config(cfg, dom)
        keys[dom] = budget.branch_key(base, sft, tcfg[dom], cfg.device, kd_teacher=kd, root=ctx.run.root)
        # One domain's set changed: only its branch retrains (and the mixture, whose data changed).
        previous = budget.reusable(ctx.run.stage_dir("train") / dom, keys[dom])
        if previous is not None:
            shutil.copytree(ctx.run.stage_dir("train") / dom, ctx.out / dom, copy_function=os.link)
            reused[dom] = previous
            continue
        jobs[dom] = prepare_sft(base, [sft], str(ctx.out / dom), tcfg[dom],
                                device=cfg.device, name=f"branch-{dom}", storage_dir=str(ctx.work / dom),
                                kd_teacher=kd)
    # passes over its own set each branch makes (epochs, or what its max_steps amount to)
    reps = {d: r["passes"] for d, r in reused.items()}
    reps.update({d: budget.passes(j.total_steps, j.data["rows"], j.cfg) for d, j in jobs.items()})
    mixture_reps: dict[str, float] = {}
    if cfg.train.mixture_baseline:
        # The reviewer's first question: one student on everything, seeing each domain's samples
        # as often as that domain's branch did (one pass over the sets repeated accordingly).
        mix_file = ctx.work / "mixture-sft.jsonl"
        mixture_reps = budget.write_mixture_set(sets, reps, mix_file, cfg.train.seed)
        jobs[MIXTURE] = prepare_sft(base, [str(mix_file)], str(ctx.out / MIXTURE),
                                    dataclasses.replace(cfg.train, epochs=1.0, max_steps=None),
                                    device=cfg.device, name=MIXTURE, storage_dir=str(ctx.work / MIXTURE),
                                    kd_teacher=kd)
        mix = jobs[MIXTURE]  # one pass to the nearest step (a ceil could add most of a step's rows)
        mix.total_steps = max(1, round(mix.data["rows"] / budget.rows_per_step(mix.cfg)))
    log.info("train: %d student(s) from %s: %s%s", len(jobs), base,
             ", ".join(f"{d} ({j.data['kept']} samples, {j.total_steps} steps)" for d, j in jobs.items()),
             f"; reused unchanged: {', '.join(reused)}" if reused else "")
    # live loss curves: a driver thread tails each branch's rank-0 progress file into its tracking run
    tail = tracking.tail_progress("train", {d: (j.storage / f"{j.name}-progress.jsonl",
                                                {**to_dict(j.cfg), "kept_samples": j.data["kept"],
                                                 "total_steps": j.total_steps}) for d, j in jobs.items()})
    def fit(job):
        try:
            return fit_sft(job), None
        except Exception as e:  # noqa: BLE001 (the other branches finish; their checkpoints stay)
            return None, e
    # Each training asks Ray for its workers, so they run side by side when the cluster has room
    # and queue when it does not; on CPUs at most as many as the cores hold (train.concurrent).
    at_once = train_concurrency(cfg.device, cfg.train, len(jobs))
    if at_once < len(jobs):
        log.info("train: %d at a time (train.concurrent; the cores hold %d training(s) of %d worker(s))",
                 at_once, at_once, cfg.train.num_workers)
    with TrainProgress({d: (j.storage / f"{j.name}-progress.jsonl", j.total_steps) for d, j in jobs.items()}):
        outcome = dict(zip(jobs, run_at_most(at_once, [lambda j=j: fit(j) for j in jobs.values()],
                                             name="branch")))
    results = {d: r for d, (r, e) in outcome.items() if e is None}
    errors = {d: e for d, (r, e) in outcome.items() if e is not None}
    tail.stop(results)
    if errors:
        dom, err = next(iter(errors.items()))
        raise RuntimeError(f"branch {dom} failed ({type(err).__name__}: {err}); rerun the stage to "
                           "continue from its last checkpoint") from err
    for d, r in results.items():  # what each model trained on, per domain, and what it cost
        r["worker_s"], r["compute_unit"] = budget.worker_seconds(r["wall_s"], jobs[d].cfg, cfg.device)
        if d == MIXTURE:
            mix_pass = budget.passes(r["total_steps"], r["rows"], jobs[d].cfg)
            r["tokens_per_domain"] = {x: budget.tokens_per_domain(jobs[x].data if x in jobs else reused[x],
                                                                  mixture_reps[x] * mix_pass) for x in sets}
        else:
            r["passes"] = round(reps[d], 3)
            r["tokens_per_domain"] = {d: budget.tokens_per_domain(r, reps[d])}
            budget.mark(ctx.out / d, keys[d], r)
    for d, r in reused.items():
        results[d] = {**r, "reused": True}
    out: dict = {"branches": len(results) - int(MIXTURE in results), "models": {d: f"train/{d}" for d in results},
                 "trained": sorted(jobs), "reused": sorted(reused)}
    for dom, m in results.items():
        out[f"{dom}_final_loss"] = round(m["final_loss"], 4)
        out[f"{dom}_tokens_per_s"] = m["tokens_per_s"]
    out["per_branch"] = results
    return out


# The branches (and the mixture baseline) from the student base on the verified SFT sets.
STAGE = Stage("train", run, reads=("train", "student", "device"), inputs=("verify",),
              extra=lambda c: {"kd_teacher": c.train.kd.teacher or c.teacher.model} if c.train.kd.weight > 0 else {},
              domains_ignored=("train", "extra_train", "dev", "test", "extra_test", "system_prompt",
                               "instruction_suffix", "eval_samples", "require_correct", "language", "kind"))
