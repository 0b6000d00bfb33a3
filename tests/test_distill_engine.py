"""On-policy distillation's engine side: a teacher's prefill logprobs of given token ids (vLLM's
prompt_logprobs on a warm engine) equal the log-softmax of an HF forward pass at the same ids,
at temperature 1 and at a sampling temperature; the student's sampled tokens are scored as they
were sampled; a model scoring its own samples gives an advantage of exactly 0."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from rdistill.config import EngineConfig
from rdistill.llm.warm import WarmPool, engine_kwargs
from rdistill.toy.build import ASSETS
from rdistill.toy.domains import records

pytestmark = pytest.mark.slow

KW = engine_kwargs("cpu", EngineConfig(dtype="float32", max_model_len=512))


def _rows(n: int = 6) -> list[dict]:
    recs = records("science", "train", n, 0)
    return [{"id": str(i), "messages": [{"role": "user", "content": r["prompt"]}], "seed": 100 + i}
            for i, r in enumerate(recs)]


@functools.lru_cache(maxsize=2)
def _hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _hf_logprobs(model_dir, prompt_ids, completion_ids, temperature):
    import torch
    m = _hf(model_dir)
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = m(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)
    p = len(prompt_ids)
    return np.array([lp[p - 1 + j, t].item() for j, t in enumerate(completion_ids)])


def test_prefill_logprobs_equal_hf_log_softmax(ray_cluster):
    base, teacher = str(ASSETS / "base"), str(ASSETS / "teacher")
    sampling = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 48}
    with WarmPool(1, "cpu", EngineConfig()) as pool:
        sampled = [a for _, a, _ in pool.generate([{"model": base, "kwargs": KW, "task": "sample",
                                                    "sampling": sampling, "rows": _rows()}])][0]
        toks = [{"id": a["id"], "prompt_ids": a["prompt_ids"], "completion_ids": a["completion_ids"]}
                for a in sampled]
        jobs = [{"model": m, "kwargs": KW, "task": "score", "temperature": t, "rows": toks, "top_k": 0}
                for m, t in ((base, 0.7), (teacher, 1.0), (teacher, 0.7), (base, 0.7))]
        scored = []
        for job in jobs:  # one after another: the order is what the same-model check below needs
            scored += [(job, a, info) for _, a, info in pool.generate([job])]
    assert [info["how"] for _, _, info in scored] == ["same", "reloaded", "same", "reloaded"]
    assert all(len(a["completion_ids"]) > 5 for a in sampled)
    for job, answers, _ in scored:
        for tk, a in zip(toks, answers):
            hf = _hf_logprobs(job["model"], tk["prompt_ids"], tk["completion_ids"], job["temperature"])
            np.testing.assert_allclose(a["logprobs"], hf, atol=1e-3)
    # the sampler's logprobs are those of the tempered distribution it sampled from
    for a in sampled:
        hf = _hf_logprobs(base, a["prompt_ids"], a["completion_ids"], 0.7)
        np.testing.assert_allclose(a["logprobs"], hf, atol=1e-3)
    # the student's prefill of its own tokens, twice (after a round trip through another model's
    # weights): bit for bit the same, so a model distilled from itself has advantage 0
    first, again = scored[0][1], scored[3][1]
    assert [a["logprobs"] for a in first] == [a["logprobs"] for a in again]
    # a teacher's tempered logprobs differ from its untempered ones (the scale took effect)
    assert not np.allclose(scored[1][1][0]["logprobs"], scored[2][1][0]["logprobs"], atol=1e-3)


def test_kd_capture_stores_the_teachers_top_k_at_each_loss_token(ray_cluster, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rdistill.config import EngineConfig as E
    from rdistill.config.distill import KDConfig
    from rdistill.data.packing import PackedRows, build_rows, save_token_rows
    from rdistill.data.sft import IGNORE
    from rdistill.train.kd import capture_topk
    tok = AutoTokenizer.from_pretrained(ASSETS / "base")
    samples = []
    for i, r in enumerate(records("math", "train", 5, 0)):
        ids = tok(r["prompt"] + " <think> 1+1=2 </think> \\boxed{2}")["input_ids"]
        tgt = [IGNORE] * 6 + ids[7:] + [IGNORE]  # loss on all but the first tokens
        samples.append({"ids": np.array(ids, np.int32), "targets": np.array(tgt, np.int32)})
    rows = build_rows([len(s["ids"]) for s in samples], 120, True)
    save_token_rows(tmp_path / "rows", samples, rows)
    info = capture_topk(tmp_path / "rows", str(ASSETS / "teacher"), KDConfig(weight=1.0, top_k=4, temperature=1.0),
                        "cpu", E(dtype="float32", max_model_len=256))
    assert info == {"kd_samples": 5, "kd_top_k": 4, "kd_bytes_per_token": 24}
    pr = PackedRows(tmp_path / "rows")
    assert len(pr) < len(samples)  # samples share rows: the capture must find each one's span
    m = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32)
    flat_ids, flat_lp = np.asarray(pr.kd["kd_ids"]), np.asarray(pr.kd["kd_logprobs"], np.float32)
    starts = list(np.flatnonzero(np.asarray(pr.positions) == 0)) + [len(pr.ids)]
    same = total = 0
    for a, e in zip(starts[:-1], starts[1:]):  # each sample alone through HF
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor(np.asarray(pr.ids[a:e]), dtype=torch.long)[None]).logits[0], -1)
        mask = np.asarray(pr.targets[a:e]) != IGNORE
        top = lp.topk(4, -1)
        np.testing.assert_allclose(flat_lp[a:e][mask], top.values.numpy()[mask], atol=2e-3, rtol=1e-3)  # float16
        same += (flat_ids[a:e][mask] == top.indices.numpy()[mask]).sum()
        total += mask.sum()
    assert total == sum((s["targets"] != IGNORE).sum() for s in samples)
    assert same / total > 0.98, same / total  # the ids agree but where two logprobs tie within float noise
