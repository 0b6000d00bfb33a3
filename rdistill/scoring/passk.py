"""pass@k over n samples per prompt, its standard error, and the merge-candidate choice.

pass@k uses the unbiased estimator of Chen et al. (2021): for a prompt with n samples of which c
are correct, pass@k = 1 - C(n-c, k) / C(n, k); with k = 1 it is c / n, so pass@1 averaged over
prompts is the mean per-sample correctness, as in the reference protocol. The standard error
treats prompts as the unit (samples of one prompt are correlated): the sample standard deviation
of the per-prompt scores over sqrt(number of prompts).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from rdistill.config.fields import ConfigError
from rdistill.errors import ResourceError


def pass_at_k(n: int, c: int, k: int = 1) -> float:
    """Unbiased pass@k of one prompt with n samples, c of them correct (needs k <= n)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got n={n}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the ratio of binomials without overflow.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_and_stderr(per_prompt: Iterable[float]) -> tuple[float, float | None]:
    """Mean of per-prompt scores and its standard error (None with fewer than 2 prompts)."""
    x = np.asarray(list(per_prompt), dtype=float)
    if x.size == 0:
        raise ValueError("no prompts to score")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return float(x.mean()), se


def aggregate(samples, k: int = 1, keys: tuple[str, ...] = ("model", "domain")) -> list[dict]:
    """Per-sample rows (columns: *keys, prompt_id, correct, optional error, optional infra) -> one
    record per key group: {model, domain, n_prompts, n_samples, pass_at_1, stderr, n_errors,
    n_infra}. A sample whose generation failed counts as incorrect and is counted in n_errors.
    A sample the verifier could not judge (`infra`: the sandbox or a busy machine failed) is left
    out of pass@1 and counted in n_infra; a prompt with no judged sample is left out too."""
    import pandas as pd
    df = pd.DataFrame(samples)
    if df.empty:
        return []
    if "error" not in df:
        df["error"] = None
    if "infra" not in df:
        df["infra"] = False
    df["infra"] = df["infra"].fillna(False).astype(bool)
    df["failed"] = df["error"].notna() & (df["error"].astype(str) != "")
    out = []
    for key, g in df.groupby(list(keys), sort=True):
        judged = g[~g["infra"]]
        if judged.empty:
            raise ResourceError(f"evaluate: no sample of {key} could be judged ({len(g)} sandbox or busy-machine "
                                "failures, reason column of evaluate/samples.parquet): fix the code sandbox and rerun")
        per = judged.groupby("prompt_id").agg(n=("correct", "size"), c=("correct", "sum"))
        scores = [pass_at_k(int(n), int(c), k) for n, c in zip(per["n"], per["c"])]
        mean, se = mean_and_stderr(scores)
        rec = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rec.update(n_prompts=int(len(per)), n_samples=int(per["n"].max()),
                   pass_at_1=round(mean, 6), stderr=None if se is None else round(se, 6),
                   n_errors=int(g["failed"].sum()), n_infra=int(g["infra"].sum()))
        if k != 1:
            rec[f"pass_at_{k}"] = rec.pop("pass_at_1")
        out.append(rec)
    return out


def objective_score(scores: Mapping[str, float], objective: str,
                    weights: Mapping[str, float] | None = None) -> float:
    """Combine per-domain scores into one number: their mean, their minimum, or their mean
    weighted by `weights` (domains it does not name weigh 0)."""
    if not scores:
        raise ValueError("no domain scores to combine")
    vals = list(scores.values())
    if objective == "mean":
        return float(np.mean(vals))
    if objective == "min":
        return float(min(vals))
    if objective == "weighted":
        w = {d: float((weights or {}).get(d, 0.0)) for d in scores}
        if sum(w.values()) <= 0:
            raise ConfigError("merge.objective=weighted needs merge.domain_weights with a positive weight "
                              f"for one of {', '.join(scores)}")
        return float(sum(w[d] * v for d, v in scores.items()) / sum(w.values()))
    raise ConfigError(f"merge.objective={objective!r} is invalid: allowed: mean, min, weighted")


def select_candidate(dev_scores: Mapping[str, Mapping[str, float]], objective: str,
                     weights: Mapping[str, float] | None = None) -> str:
    """The candidate with the best objective on the dev split (first listed wins a tie)."""
    if not dev_scores:
        raise ValueError("no merge candidates were scored")
    best, best_val = None, -math.inf
    for name, per_domain in dev_scores.items():  # insertion order = config order
        val = objective_score(per_domain, objective, weights)
        if val > best_val:
            best, best_val = name, val
    return best
