"""Token-level jobs on a running vLLM engine: sample with token ids and logprobs, and score given
token ids with prompt logprobs (a teacher's prefill). Run by rdistill.llm.warm.WarmEngine for
jobs whose `task` is `sample` or `score`; the on-policy distillation stage uses both.

Token ids go in and come out, so nothing is re-tokenised between the student that samples and
the teacher that scores. Temperature: an engine's logprobs are those of its raw logits
(vLLM's logprobs_mode raw_logprobs), so a job with temperature t first sets the model's logit
scale to 1/t (rdistill.llm.worker_ext): prompt logprobs are then log_softmax(logits / t), the
distribution the model samples from at t.
"""

from __future__ import annotations

from typing import Any

from rdistill.errors import RdistillError


class NoPromptLogprobs(RdistillError):
    """The engine returned no prompt logprobs for a scoring request."""


def sample(llm, rows: list[dict], sampling: dict) -> list[dict]:
    """Chat rows [{id, messages, seed}] sampled once each; per row the prompt's token ids, the
    completion's token ids, the sampled tokens' logprobs (at the sampling temperature) and the
    finish reason."""
    from vllm import SamplingParams
    if not rows:
        return []
    params = [SamplingParams(temperature=sampling["temperature"], top_p=sampling["top_p"],
                             max_tokens=sampling["max_tokens"], seed=r.get("seed"), logprobs=0) for r in rows]
    outs = llm.chat([r["messages"] for r in rows], params, use_tqdm=False)
    answers = []
    for r, o in zip(rows, outs):
        c = o.outputs[0]
        ids = list(c.token_ids)
        lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
        answers.append({"id": r["id"], "prompt_ids": list(o.prompt_token_ids), "completion_ids": ids,
                        "logprobs": lps, "completion": c.text, "finish_reason": c.finish_reason or "error"})
    return answers


def score(llm, rows: list[dict], top_k: int = 0) -> list[dict]:
    """Rows [{id, prompt_ids, completion_ids}] prefilled whole (max_tokens=1); per row the
    logprob of each completion token given everything before it, and with top_k > 0 the top_k
    (token id, logprob) pairs at each completion position."""
    from vllm import SamplingParams, TokensPrompt
    if not rows:
        return []
    # flat_logprobs: a few flat lists per request instead of a dict of Logprob objects per
    # position; detokenize=False: no token strings for the top-k (10x the Python work otherwise)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False,
                            flat_logprobs=True)
    prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_ids"]) + list(r["completion_ids"])) for r in rows]
    outs = llm.generate(prompts, params, use_tqdm=False)
    answers = []
    for r, o in zip(rows, outs):
        flat = o.prompt_logprobs
        if flat is None:
            raise NoPromptLogprobs("the scoring engine returned no prompt logprobs: it must be a vLLM engine "
                                   "started by rdistill (an endpoint or another server cannot score given tokens)")
        # position j's entries: the token at j first, then the top_k in rank order
        first = len(r["prompt_ids"])
        starts = flat.start_indices[first:first + len(r["completion_ids"])]
        ends = flat.end_indices[first:first + len(r["completion_ids"])]
        ids, lps = flat.token_ids, flat.logprobs
        out: dict[str, Any] = {"id": r["id"], "logprobs": [float(lps[s]) for s in starts]}
        if top_k:
            out["top"] = [list(zip(ids[s + 1:e], lps[s + 1:e])) for s, e in zip(starts, ends)]
        answers.append(out)
    return answers
