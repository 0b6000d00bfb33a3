"""Warm engines: a model's weights loaded into a running vLLM engine give exactly the answers a
fresh engine gives (greedy, and seeded sampling), and a model of another family gets an engine
of its own."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from rdistill.config import EngineConfig
from rdistill.llm.warm import WarmPool, engine_kwargs, family, kept_warm
from rdistill.toy.build import ASSETS
from rdistill.toy.domains import records

pytestmark = pytest.mark.slow

KW = engine_kwargs("cpu", EngineConfig(max_model_len=512))
GREEDY = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 128}  # science traces run ~90 tokens
SAMPLED = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 128}


def _rows(n: int = 24) -> list[dict]:
    recs = records("math", "test", n // 2, 0) + records("science", "test", n // 2, 0)
    return [{"id": str(i), "messages": [{"role": "user", "content": r["prompt"]}], "seed": 7000 + i}
            for i, r in enumerate(recs)]


def _job(model, sampling):
    return {"model": str(model), "kwargs": KW, "sampling": sampling, "rows": _rows()}


def _tmp_sockets() -> set:
    return {p for p in Path(tempfile.gettempdir()).iterdir() if p.is_socket()}


def test_reloaded_weights_answer_like_a_fresh_engine(ray_cluster, tmp_path):
    from rdistill.toy.model import tiny_test_model
    from rdistill.topology import vllm_ipc_dir
    before = _tmp_sockets()
    base, teacher = ASSETS / "base", ASSETS / "teacher"
    other = tiny_test_model(tmp_path / "other")  # another tokenizer: another family
    assert family(str(base)) == family(str(teacher)) != family(str(other))
    with WarmPool(1, "cpu", EngineConfig()) as pool:
        warm = [(j["model"], a, i) for j, a, i in pool.generate(
            [_job(base, GREEDY), _job(teacher, GREEDY), _job(teacher, SAMPLED), _job(other, GREEDY)])]
    hows = [(m, i["how"]) for m, _, i in warm]
    assert hows == [(str(base), "started"), (str(teacher), "reloaded"), (str(teacher), "same"),
                    (str(other), "started")], hows
    # one fresh engine loads the teacher from disk and answers both ways (per-sample seeds make
    # the sampled answers independent of what the engine ran before; one engine start less);
    # opened as the pipeline opens a stage's pool, which outlives its stage's close
    with kept_warm():
        with WarmPool.open(1, "cpu", EngineConfig()) as pool:
            out = list(pool.generate([_job(teacher, GREEDY), _job(teacher, SAMPLED)]))
        assert pool.engines  # closed by its stage, kept by the pipeline
        again = WarmPool.open(1, "cpu", EngineConfig())  # the next stage, same settings: the running engine
        assert again is pool and [i["how"] for _, _, i in again.generate([_job(base, GREEDY)])] == ["reloaded"]
        other_pool = WarmPool.open(1, "cpu", EngineConfig(dtype="float32"))  # other settings: the old pool ends first
        assert other_pool is not pool and not pool.engines and other_pool.engines
    assert not other_pool.engines  # the pipeline's end ends the rest
    assert [i["how"] for _, _, i in out] == ["started", "same"]
    fresh, fresh_sampled = out[0][1], out[1][1]
    text = lambda answers: [a["completion"] for a in sorted(answers, key=lambda a: int(a["id"]))]  # noqa: E731
    assert text(warm[1][1]) == text(fresh)               # greedy: exactly
    assert text(warm[2][1]) == text(fresh_sampled)       # sampled with per-sample seeds: the same text
    assert text(warm[0][1]) != text(warm[1][1])           # the reload did change the model
    # vLLM's IPC sockets (never unlinked by vLLM) went to the run's folder, removed at exit
    assert _tmp_sockets() - before == set()
    assert any(p.is_socket() for p in Path(vllm_ipc_dir()[0]).iterdir())
    assert sum("</think>" in t for t in text(fresh)) == len(fresh)  # the teacher answers in format
