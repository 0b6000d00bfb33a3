"""The distill stage: on-policy distillation of the run's merge from each domain's branch.

What a merge loses on a domain is still in that domain's branch, which shares the merge's
tokenizer, so the branch can score the merged student's own samples. Each round:
1. sample: the current student (a frozen snapshot: the model the last round wrote) samples k
   completions for n train prompts per domain on a warm vLLM engine (its weights reloaded in
   place, rdistill.llm.warm), token ids and logprobs returned;
2. score: each domain's teacher (and for reverse_kl the student) prefills prompt + completion
   ids (prompt logprobs, max_tokens=1; the teacher's top-k too for topk_kl) on the same engine,
   weights swapped in place (one family);
3. advantage: teacher logprob - student logprob per sampled token (negative reverse KL);
4. update, in the project's Ray Train + DeepSpeed loop (rdistill.train: packed rows, chunked
   loss, sequence parallelism), from the snapshot, for steps_per_round steps (samples are at
   most one round stale): distill.loss topk_kl (default) trains KL(teacher top-k || student) at
   every completion position (the teacher's top-k come back from its prefill); reverse_kl the
   importance-weighted policy gradient of the advantages.
Each finished round leaves its model and `done.json` in the stage's work folder, so a killed
stage resumes after its last finished round. Outputs: `model/` (the `distilled` reference, the
`merge+distill` row of evaluate), `rounds.json` (per-round statistics, costs and the dev curve).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from rdistill.config import to_dict
from rdistill.config.distill import distill_train_config
from rdistill.distill.checks import check_teachers
from rdistill.distill.rounds import round_rows, sample_and_score, train_prompts, write_rows
from rdistill.log import log
from rdistill.rundir import write_json_atomic
from rdistill.stage_api import Stage, StageContext


def engine_config(cfg):
    """The evaluation engine (eval.engine), as evaluate's jobs give it (rdistill.llm.spec): the
    stage samples and scores students as evaluation does, so the merge search's engine, kept
    running by the pipeline, serves it and then evaluate, with no start of its own."""
    from rdistill.llm.spec import LLMSpec
    return LLMSpec.for_student(cfg, "", "").engine


def _round_dir(ctx: StageContext, r: int) -> Path:
    return ctx.work / f"round-{r:02d}"


def finished_rounds(ctx: StageContext) -> list[dict]:
    """The rounds a previous attempt finished, in order (stops at the first unfinished one)."""
    out = []
    for r in range(ctx.cfg.distill.rounds):
        done = _round_dir(ctx, r) / "done.json"
        if not done.exists():
            break
        out.append(json.loads(done.read_text()))
    return out


def dev_scores(pool, ctx: StageContext, models: dict[str, str]) -> dict[str, dict]:
    """pass@1 (with its standard error) per domain of each {name: model path} on the first
    distill.dev_prompts dev prompts, on the stage's engine (the curve of the report's plot); one
    call, so one model's answers are judged while the next one's are sampled."""
    from rdistill.llm.spec import LLMSpec
    from rdistill.prompts.eval_rows import prompt_records, sample_rows
    from rdistill.scoring.answers import answer_and_score
    from rdistill.scoring.passk import aggregate
    cfg, dc = ctx.cfg, ctx.cfg.distill
    rows = []
    for d in sorted(cfg.domains):
        recs = prompt_records(cfg, d, "dev", ctx.source_path)[:dc.dev_prompts or 40]
        rows += sample_rows(cfg, d, "dev", recs, n=dc.dev_samples)
    specs = [LLMSpec(model=m, name=n, device=cfg.device, sampling=cfg.eval.sampling, engine=engine_config(cfg))
             for n, m in models.items()]
    out = {}
    for spec, df, _ in answer_and_score(pool, [(s, rows) for s in specs], cfg.verify.sandbox):
        df["model"] = spec.name
        out[spec.name] = {r["domain"]: {"pass_at_1": r["pass_at_1"], "stderr": r["stderr"], "n_prompts": r["n_prompts"]}
                          for r in aggregate(df)}
    return out


class _Engine:
    """The stage's warm engine, opened when needed (the merge search's, still running, when the
    pipeline kept it and the settings match); closed for the update on GPUs (training needs the
    memory), kept on CPUs (a restart costs more than the engine's RAM)."""

    def __init__(self, device: str, engine, tp: int):
        self.device, self.engine, self.tp, self.pool = device, engine, tp, None

    def get(self):
        from rdistill.llm.warm import WarmPool
        if self.pool is None:
            self.pool = WarmPool.open(1, self.device, self.engine, self.tp)
        return self.pool

    def release(self, last: bool = False) -> None:
        """Before an update (GPUs: end it); `last`: the stage is done (kept for evaluate if the
        pipeline keeps engines across stages)."""
        if self.pool is not None and (last or self.device == "gpu"):
            self.pool.close(force=not last)
            self.pool = None


def _update(student: str, rows_dir: Path, out: Path, cfg, storage: Path, r: int) -> dict:
    """One round's update in Ray Train (rdistill.train), from `student` to `out`."""
    from rdistill.train.sft import fit_sft, prepare_rows
    pg = cfg.distill.loss == "reverse_kl"  # else topk_kl: the KD term of SFT rows (train.kd)
    job = prepare_rows(student, str(rows_dir), str(out), distill_train_config(cfg), device=cfg.device,
                       name=f"distill-round-{r}", storage_dir=str(storage),
                       objective="policy_gradient" if pg else "sft", temperature=cfg.distill.temperature,
                       clip=cfg.distill.clip)
    return fit_sft(job)


def choose_merge(engine, ctx: StageContext) -> tuple[str, dict, dict]:
    """`merged` before the evaluate stage has chosen on dev (a fresh run): the merge candidate with
    the best dev objective (merge.objective), scored here as evaluate would, on the first
    distill.dev_prompts (or 40) dev prompts per domain. Returns (path, its dev scores, all)."""
    from rdistill.scoring.passk import select_candidate
    cfg = ctx.cfg
    names = cfg.merge.names()
    scores = dev_scores(engine.get(), ctx, {n: ctx.model(f"merge:{n}") for n in names})
    best = select_candidate({n: {d: v["pass_at_1"] for d, v in s.items()} for n, s in scores.items()},
                            cfg.merge.objective, cfg.merge.domain_weights)
    log.info("distill: student = merge:%s (best %s objective on dev among %s)", best, cfg.merge.objective,
             ", ".join(names))
    return ctx.model(f"merge:{best}"), scores[best], {"candidate": best, "dev": scores}


def run(ctx: StageContext) -> dict:
    from rdistill.llm.warm import engine_kwargs
    from rdistill.refs import merge_selection
    from rdistill.topology import eval_tensor_parallel, init_ray
    cfg, dc = ctx.cfg, ctx.cfg.distill
    t_start = time.time()
    choose = dc.student == "merged" and len(cfg.merge.names()) > 1 and \
        not (ctx.run.stage_dir("evaluate") / "selection.json").exists()
    start = ctx.model(f"merge:{cfg.merge.names()[0]}" if choose else dc.student)
    teachers = check_teachers(cfg, start, ctx.model)  # one-line errors, before any engine starts
    prompts = train_prompts(cfg, ctx.source_path)
    init_ray(cfg.ray)
    engine = _Engine(cfg.device, cfg.eval.engine, eval_tensor_parallel(cfg))
    choice_file, curve0 = ctx.work / "choice.json", ctx.work / "dev-start.json"
    try:
        if choose:  # which merge is `merged` is evaluate's dev choice, which a fresh run has not made yet
            if not choice_file.exists():
                path, dev, choice = choose_merge(engine, ctx)
                write_json_atomic(curve0, dev)
                write_json_atomic(choice_file, dict(choice, path=path))
            start = json.loads(choice_file.read_text())["path"]
        elif merge_selection(ctx.run) and dc.student == "merged":
            log.info("distill: student = the run's chosen merge (%s)", merge_selection(ctx.run).get("candidate"))
        kwargs = engine_kwargs(cfg.device, engine_config(cfg))
        if dc.loss == "topk_kl" and dc.top_k > 20:  # vLLM returns at most max_logprobs (20) per position
            kwargs["max_logprobs"] = dc.top_k
        max_len = distill_train_config(cfg).max_len
        done = finished_rounds(ctx)
        student = done[-1]["model"] if done else start
        if done:
            log.info("distill: resuming after round %d of %d (%s)", len(done), dc.rounds, student)
        log.info("distill: student %s, teachers %s", start, ", ".join(f"{d}={p}" for d, p in teachers.items()))
        if dc.dev_prompts and not curve0.exists():
            write_json_atomic(curve0, dev_scores(engine.get(), ctx, {"round 0": start})["round 0"])
        for r in range(len(done), dc.rounds):
            rd = _round_dir(ctx, r)
            rd.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            if not (rd / "data.json").exists():  # a round killed in its update keeps its rows
                rows = round_rows(prompts, r, dc.prompts_per_domain, dc.samples_per_prompt, dc.seed)
                scored = sample_and_score(engine.get(), student, teachers, rows, kwargs, dc)
                stats = write_rows(scored, rd / "rows", max_len, dc.baseline)
                stats["sample_score_s"] = round(time.time() - t0, 2)
                write_json_atomic(rd / "data.json", stats)
            stats = json.loads((rd / "data.json").read_text())
            log.info("distill round %d: %d samples, %d rows; reverse KL per token %s", r + 1, stats["samples"],
                     stats["rows"], ", ".join(f"{d}={s['reverse_kl_per_token']}" for d, s in stats["domains"].items()))
            engine.release()
            t1 = time.time()
            m = _update(student, rd / "rows", rd / "model", cfg, rd / "ckpt", r)
            upd = {k: m[k] for k in ("steps", "first_loss", "final_loss", "train_time_s", "wall_s", "tokens_per_s")}
            rec = {"round": r + 1, "model": str(rd / "model"), "data": stats, "update": upd,
                   "update_s": round(time.time() - t1, 2)}
            if dc.dev_prompts:
                rec["dev"] = dev_scores(engine.get(), ctx, {f"round {r + 1}": str(rd / "model")})[f"round {r + 1}"]
            rec["wall_s"] = round(time.time() - t0, 2)
            write_json_atomic(rd / "done.json", rec)
            shutil.rmtree(rd / "ckpt", ignore_errors=True)
            student = str(rd / "model")
            done.append(rec)
    finally:
        engine.release(last=True)
    shutil.copytree(student, ctx.out / "model", ignore=shutil.ignore_patterns("snapshots"))
    curve = [{"round": 0, "dev": json.loads(curve0.read_text())}] if curve0.exists() else []
    curve += [{"round": d["round"], "dev": d["dev"]} for d in done if "dev" in d]
    rounds = [{k: v for k, v in d.items() if k != "model"} for d in done]
    choice = json.loads(choice_file.read_text()) if choice_file.exists() else None
    write_json_atomic(ctx.out / "rounds.json", {"student": start, "teachers": teachers, "loss": dc.loss,
                                                "rounds": rounds, "dev_curve": curve, "merge_choice": choice})
    last = done[-1]["data"]["domains"]
    return {"rounds": len(done), "model": "distill/model", "student": start,
            "merge_choice": choice and choice["candidate"], "wall_s": round(time.time() - t_start, 2),
            "samples": sum(d["data"]["samples"] for d in done),
            "update_s": round(sum(d["update_s"] for d in done), 2),
            "reverse_kl_last_round": {d: s["reverse_kl_per_token"] for d, s in last.items()},
            "dev_curve": curve}


def _reads(cfg) -> dict:
    """The student and teachers it distills (which merge `merged` is, the branches) come in
    through the merge and train stages' fingerprints; the prompts through the domains."""
    return {"engine": to_dict(cfg.eval.engine),  # the engine that samples and scores (evaluation's)
            "distill_eval": {"sampling": to_dict(cfg.eval.sampling), "sandbox": to_dict(cfg.verify.sandbox)}
            if cfg.distill.dev_prompts else None}


def _inputs(cfg) -> list[str]:
    """The stages that make the student and the teachers (merge for `merged`, train for branches)."""
    from rdistill.config import STAGES
    from rdistill.distill.checks import teacher_refs
    from rdistill.refs import producing_stage
    made = {producing_stage(r) for r in [cfg.distill.student, *teacher_refs(cfg).values()]}
    return [s for s in STAGES if s in made]


STAGE = Stage("distill", run, reads=("distill", "train", "student", "device", "seed"),
              inputs=_inputs, extra=_reads, engine="eval.engine", warm=True,
              domains_ignored=("extra_train", "test", "extra_test", "eval_samples", "require_correct",
                               "train_overrides"))
