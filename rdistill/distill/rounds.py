"""One round's data: the student samples, the student and each domain's teacher score the
sampled tokens by prefill, and every completion token gets its advantage.

advantage_t = log p_teacher(y_t | y_<t) - log p_student(y_t | y_<t), the negative per-token
reverse KL at the sampled token, both at their temperatures (rdistill.llm.tokens). The
student's logprob is its own prefill of the sampled tokens, not the sampler's: the same engine
path as the teacher's, so a model distilled from itself gets an advantage of exactly 0 (the
sampler's logprobs differ from a prefill's by float noise; their largest gap is recorded).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from rdistill.data.packing import KD_PAD_LOGPROB, build_rows, save_token_rows
from rdistill.data.sft import IGNORE
from rdistill.llm.batch import expand_samples
from rdistill.prompts.eval_rows import prompt_records


def train_prompts(cfg, resolve_path) -> dict[str, list[dict]]:
    """Each domain's usable train prompt records (chat messages as the generate stage sends them)."""
    c = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_prompts=None))
    return {d: prompt_records(c, d, "train", resolve_path) for d in sorted(cfg.domains)}


def round_rows(prompts: dict[str, list[dict]], r: int, n: int, k: int, seed: int) -> list[dict]:
    """Round r's chat rows: prompts [r*n, (r+1)*n) of each domain (cycling), k samples each, seeded
    by (seed, round)."""
    rows = []
    for d, recs in prompts.items():
        take = [recs[(r * n + i) % len(recs)] for i in range(min(n, len(recs)))]
        base = [{"id": f"{d}/r{r}/{i}/{x['id']}", "domain": d, "messages": x["messages"]} for i, x in enumerate(take)]
        rows += expand_samples(base, k, seed * 1000 + r)
    return rows


def _by_id(pool, jobs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for _, answers, _ in pool.generate(jobs):
        out.update({a["id"]: a for a in answers})
    return out


def sample_and_score(pool, student: str, teachers: dict[str, str], rows: list[dict], kwargs: dict, dc) -> list[dict]:
    """Rows sampled by `student` and scored by it and by their domain's teacher: per row
    {id, domain, prompt_ids, completion_ids, sampled_logprobs, student_logprobs, teacher_logprobs,
    finish_reason}."""
    sampling = {"temperature": dc.temperature, "top_p": dc.top_p, "max_tokens": dc.max_tokens}
    sampled = _by_id(pool, [{"model": student, "kwargs": kwargs, "task": "sample", "sampling": sampling,
                             "rows": [{"id": r["id"], "messages": r["messages"], "seed": r["seed"]} for r in rows]}])
    toks = {i: {"id": i, "prompt_ids": a["prompt_ids"], "completion_ids": a["completion_ids"]}
            for i, a in sampled.items() if a["completion_ids"]}
    topk = dc.top_k if dc.loss == "topk_kl" else 0
    if topk:  # the KL needs no student logprob: the sampler's serve the round's statistics
        mine = {i: {"logprobs": sampled[i]["logprobs"]} for i in toks}
    else:
        mine = _by_id(pool, [{"model": student, "kwargs": kwargs, "task": "score", "temperature": dc.temperature,
                              "rows": list(toks.values())}])
    t_temp = dc.teacher_temperature or dc.temperature
    jobs = []
    for path in sorted(set(teachers.values())):
        doms = {d for d, p in teachers.items() if p == path}
        jobs.append({"model": path, "kwargs": kwargs, "task": "score", "temperature": t_temp, "top_k": topk,
                     "rows": [toks[r["id"]] for r in rows if r["domain"] in doms and r["id"] in toks]})
    theirs = _by_id(pool, jobs)
    out = []
    for r in rows:
        if r["id"] not in toks:
            continue  # an empty completion has no token to score
        a = sampled[r["id"]]
        out.append({"id": r["id"], "domain": r["domain"], "prompt_ids": a["prompt_ids"],
                    "completion_ids": a["completion_ids"], "sampled_logprobs": a["logprobs"],
                    "student_logprobs": mine[r["id"]]["logprobs"], "teacher_logprobs": theirs[r["id"]]["logprobs"],
                    "finish_reason": a["finish_reason"], **({"teacher_top": theirs[r["id"]]["top"]} if topk else {})})
    return out


def advantages(s: dict) -> np.ndarray:
    """Per completion token: teacher logprob minus student logprob (float32)."""
    return np.asarray(s["teacher_logprobs"], np.float32) - np.asarray(s["student_logprobs"], np.float32)


def token_sample(s: dict, baseline: float = 0.0) -> dict:
    """A scored sample as a training sample: ids (prompt + completion), targets shifted within the
    sample (completion tokens only), and aligned with the targets the advantage (minus
    `baseline`) and the student's logprob of the token each position predicts; with the
    teacher's top-k (`teacher_top`), the KD columns (rdistill.data.packing.KD_COLUMNS) instead."""
    p, c = list(s["prompt_ids"]), list(s["completion_ids"])
    ids = np.asarray(p + c, np.int32)
    n = len(ids)
    targets = np.full(n, IGNORE, np.int32)
    adv = np.zeros(n, np.float32)
    old = np.zeros(n, np.float32)
    at = slice(len(p) - 1, n - 1)  # position j predicts token j+1: the completion's tokens
    targets[at] = c
    if "teacher_top" in s:
        k = max(len(t) for t in s["teacher_top"])
        kd_ids = np.zeros((n, k), np.int32)
        kd_lp = np.full((n, k), KD_PAD_LOGPROB, np.float16)
        for j, top in enumerate(s["teacher_top"]):
            kd_ids[len(p) - 1 + j, :len(top)] = [t for t, _ in top]
            kd_lp[len(p) - 1 + j, :len(top)] = [lp for _, lp in top]
        return {"ids": ids, "targets": targets, "kd_ids": kd_ids, "kd_logprobs": kd_lp}
    adv[at] = advantages(s) - np.float32(baseline)
    old[at] = np.asarray(s["student_logprobs"], np.float32)
    return {"ids": ids, "targets": targets, "advantages": adv, "old_logprobs": old}


def baselines(scored: list[dict], how: str) -> dict[str, float]:
    """The constant subtracted from each domain's advantages: its mean over the round's tokens
    (`mean`), or 0 (`none`). A constant baseline leaves the policy gradient's expectation as it is
    (the expected score of a token drawn from the policy is 0) and cuts its variance: without
    it, a student worse than its teacher almost everywhere (negative mean advantage) pushes down
    nearly every token it sampled, spreading probability onto tokens nobody sampled."""
    if how == "none":
        return {}
    out = {}
    for d in {s["domain"] for s in scored}:
        a = [advantages(s) for s in scored if s["domain"] == d]
        out[d] = float(np.concatenate(a).mean()) if a else 0.0
    return out


def write_rows(scored: list[dict], rows_dir: Path, max_len: int, baseline: str = "none") -> dict:
    """Pack the round's samples into policy-gradient rows (rdistill.data.packing); returns counts
    and per-domain statistics (tokens, mean reverse KL per token, sampler vs prefill gap)."""
    keep = [s for s in scored if len(s["prompt_ids"]) + len(s["completion_ids"]) <= max_len]
    base = baselines(keep, baseline)
    samples = [token_sample(s, base.get(s["domain"], 0.0)) for s in keep]
    rows = build_rows([len(x["ids"]) for x in samples], max_len, True)
    tmp = rows_dir.with_name(f".{rows_dir.name}.tmp-{os.getpid()}")
    counts = save_token_rows(tmp, samples, rows)
    os.replace(tmp, rows_dir)
    stats: dict = {"samples": len(scored), "dropped_too_long": len(scored) - len(keep), **counts, "domains": {}}
    for d in sorted({s["domain"] for s in scored}):
        mine = [s for s in keep if s["domain"] == d]
        a = np.concatenate([advantages(s) for s in mine]) if mine else np.zeros(0)
        # the sampler's logprobs against the student's own prefill (none for topk_kl: not prefilled)
        gap = None if any("teacher_top" in s for s in mine) else round(max(
            (float(np.max(np.abs(np.asarray(s["sampled_logprobs"]) - np.asarray(s["student_logprobs"]))))
             for s in mine), default=0.0), 6)
        stats["domains"][d] = {"samples": len(mine), "tokens": int(a.size),
                               "reverse_kl_per_token": round(float(-a.mean()), 6) if a.size else None,
                               "max_abs_advantage": round(float(np.abs(a).max()), 6) if a.size else None,
                               "sampler_prefill_max_gap": gap,
                               "cut_at_max_tokens": sum(s["finish_reason"] == "length" for s in mine)}
    return stats
