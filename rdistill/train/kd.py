"""Capture for offline logit KD (train.kd): the teacher's top-k logprobs at every loss token of
packed SFT rows, written beside them as two (tokens, k) columns (rdistill.data.packing).

The teacher prefills each sample's own token ids on a warm vLLM engine (prompt_logprobs=k,
rdistill.llm.tokens), so its distributions sit exactly on the student's positions with nothing
re-tokenised; this needs the student's tokenizer, which is checked first. Stored compactly:
int32 ids + float16 logprobs, 6 * k bytes per token (DistillKit keeps top-128 in ~100-300).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rdistill.data.packing import KD_PAD_LOGPROB, kd_bytes_per_token
from rdistill.data.sft import IGNORE
from rdistill.errors import ConfigError


def check_kd_teacher(teacher: str, student: str) -> None:
    from transformers import AutoTokenizer
    if not (Path(teacher) / "config.json").exists():
        raise ConfigError(f"train.kd: the KD teacher {teacher} is not a local model a vLLM engine can prefill: "
                          "set train.kd.teacher to one with the student's tokenizer (or train.kd.weight=0)")
    a, b = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    if a.get_vocab() != b.get_vocab():
        raise ConfigError(f"train.kd: the KD teacher {teacher} has another tokenizer than the student {student}: "
                          "logit KD needs a shared vocabulary (set train.kd.weight=0 or another train.kd.teacher)")


def _samples(rows_dir: Path):
    """(start, end) of every sample in the flat arrays (positions restart at 0 per sample)."""
    pos = np.load(rows_dir / "positions.npy", mmap_mode="r")
    tgt = np.load(rows_dir / "targets.npy", mmap_mode="r")
    starts = np.flatnonzero(np.asarray(pos) == 0)
    ends = np.append(starts[1:], len(pos))
    return [(int(a), int(e)) for a, e in zip(starts, ends) if (np.asarray(tgt[a:e]) != IGNORE).any()]


def capture_topk(rows_dir: str | Path, teacher: str, kd, device: str, engine_cfg, batch: int = 256) -> dict:
    """Write kd_ids / kd_logprobs for every loss position of the rows in `rows_dir`."""
    from rdistill.llm.warm import WarmPool, engine_kwargs
    rows_dir = Path(rows_dir)
    ids = np.load(rows_dir / "ids.npy", mmap_mode="r")
    n, k = len(ids), kd.top_k
    out_ids = np.lib.format.open_memmap(rows_dir / ".kd_ids.npy", mode="w+", dtype=np.int32, shape=(n, k))
    out_lp = np.lib.format.open_memmap(rows_dir / ".kd_logprobs.npy", mode="w+", dtype=np.float16, shape=(n, k))
    out_lp[:] = KD_PAD_LOGPROB
    spans = _samples(rows_dir)
    kwargs = engine_kwargs(device, engine_cfg)
    kwargs["max_logprobs"] = max(k, 20)
    jobs = []
    for s in range(0, len(spans), batch):
        part = spans[s:s + batch]
        # prompt = the first token: every later position's distribution comes back
        jobs.append({"model": teacher, "kwargs": kwargs, "task": "score", "temperature": kd.temperature,
                     "top_k": k, "rows": [{"id": str(a), "prompt_ids": [int(ids[a])],
                                           "completion_ids": [int(x) for x in ids[a + 1:e]]} for a, e in part]})
    with WarmPool(1, device, engine_cfg) as pool:
        for _, answers, _ in pool.generate(jobs):
            for ans in answers:
                a = int(ans["id"])
                for j, top in enumerate(ans["top"]):  # top[j]: the distribution of token a+1+j, predicted at a+j
                    out_ids[a + j, :len(top)] = [t for t, _ in top]
                    out_lp[a + j, :len(top)] = [lp for _, lp in top]
    out_ids.flush()
    out_lp.flush()
    (rows_dir / ".kd_ids.npy").rename(rows_dir / "kd_ids.npy")
    (rows_dir / ".kd_logprobs.npy").rename(rows_dir / "kd_logprobs.npy")
    return {"kd_samples": len(spans), "kd_top_k": k, "kd_bytes_per_token": kd_bytes_per_token(k)}
