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

from rdistill import tracking
from rdistill.config import branch_train_config, to_dict
from rdistill.log import log
from rdistill.parallel import run_at_most
from rdistill.stage_api import Stage, StageContext
from rdistill.topology import init_ray
from rdistill.refs import MIXTURE
from rdistill.train.sft import fit_sft, prepare_sft


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    base = ctx.model(cfg.student.base)
    init_ray(cfg.ray)  # before preparing: tokenizing a large SFT set runs as a Ray Data job
    jobs = {}
    sets = {dom: str(ctx.run.stage_dir("verify") / f"{dom}.jsonl") for dom in sorted(cfg.domains)}
    # offline logit KD (train.kd.weight > 0): the teacher's top-k logprobs captured into the rows
    kd = ctx.model(cfg.train.kd.teacher or cfg.teacher.model) if cfg.train.kd.weight > 0 else None
    for dom, sft in sets.items():
        jobs[dom] = prepare_sft(base, [sft], str(ctx.out / dom), branch_train_config(cfg, dom),
                                device=cfg.device, name=f"branch-{dom}", storage_dir=str(ctx.work / dom),
                                kd_teacher=kd)
    if cfg.train.mixture_baseline:
        # The reviewer's first question: one student on everything, for as many optimizer
        # steps as the branches take together.
        steps = sum(j.total_steps for j in jobs.values())
        jobs[MIXTURE] = prepare_sft(base, list(sets.values()), str(ctx.out / MIXTURE),
                                    dataclasses.replace(cfg.train, max_steps=steps), device=cfg.device,
                                    name=MIXTURE, storage_dir=str(ctx.work / MIXTURE), kd_teacher=kd)
    log.info("train: %d student(s) from %s: %s", len(jobs), base,
             ", ".join(f"{d} ({j.data['kept']} samples, {j.total_steps} steps)" for d, j in jobs.items()))
    # live loss curves: a driver thread tails each branch's rank-0 progress file into its tracking run
    tail = tracking.tail_progress("train", {d: (j.storage / f"{j.name}-progress.jsonl",
                                                {**to_dict(j.cfg), "kept_samples": j.data["kept"],
                                                 "total_steps": j.total_steps}) for d, j in jobs.items()})
    def fit(job):
        try:
            return fit_sft(job), None
        except Exception as e:  # noqa: BLE001 (the other branches finish; their checkpoints stay)
            return None, e
    # Every branch at once: each asks Ray for its workers, so they run side by side when the
    # cluster has room and queue when it does not.
    outcome = dict(zip(jobs, run_at_most(len(jobs), [lambda j=j: fit(j) for j in jobs.values()], name="branch")))
    results = {d: r for d, (r, e) in outcome.items() if e is None}
    errors = {d: e for d, (r, e) in outcome.items() if e is not None}
    tail.stop(results)
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


# The branches (and the mixture baseline) from the student base on the verified SFT sets.
STAGE = Stage("train", run, reads=("train", "student", "device"), inputs=("verify",),
              extra=lambda c: {"kd_teacher": c.train.kd.teacher or c.teacher.model} if c.train.kd.weight > 0 else {},
              domains_ignored=("train", "extra_train", "dev", "test", "extra_test", "system_prompt",
                               "instruction_suffix", "eval_samples", "require_correct", "language", "kind"))
