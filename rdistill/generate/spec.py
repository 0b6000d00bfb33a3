"""What an LLM batch-inference run needs, shared by the generate and evaluate stages.

`rdistill.generate.llm.generate(ds, spec)` runs a Ray Dataset of chat rows through either a
vLLM engine hosted by Ray Data (`ray.data.llm`) or an OpenAI-compatible endpoint (Ray Data's
HTTP processor), and returns the rows with the model's answer added.

Input rows: `id` (str, unique), `messages` (list of {role, content}), optional `seed` (int),
plus any other columns, which are kept. Output rows add `completion` (str), `finish_reason`
(stop | length | error), `prompt_tokens`, `completion_tokens` (int) and `error` (str or None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from rdistill.config import SamplingConfig, TeacherConfig


@dataclass
class LLMSpec:
    model: str
    """Resolved model path or HF id (vllm backend), or the model name sent to the endpoint."""
    name: str = ""
    """Name recorded in output rows (defaults to model)."""
    backend: str = "vllm"
    """vllm | openai."""
    device: str = "cpu"
    """cpu: CPU placement bundles and vLLM's CPU backend; gpu: GPU bundles."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling settings of every row (`n` is expanded into rows by the caller)."""
    max_model_len: int = 1024
    dtype: str = "bfloat16"
    batch_size: int = 16
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    replicas: int = 1
    base_url: Optional[str] = None
    api_key_env: Optional[str] = None
    qps: Optional[float] = None
    max_retries: int = 6
    retry_wait_s: float = 1.0
    """First backoff wait between retries (doubles each retry)."""
    timeout_s: float = 600.0
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or self.model

    @classmethod
    def from_teacher(cls, t: TeacherConfig, model: str, sampling: SamplingConfig, device: str) -> "LLMSpec":
        return cls(model=model, name=t.name, backend=t.backend, device=device, sampling=sampling,
                   max_model_len=t.max_model_len, dtype=t.dtype, batch_size=t.batch_size,
                   tensor_parallel_size=t.tensor_parallel_size,
                   pipeline_parallel_size=t.pipeline_parallel_size, replicas=t.replicas,
                   base_url=t.base_url, api_key_env=t.api_key_env, qps=t.qps,
                   max_retries=t.max_retries, retry_wait_s=t.retry_wait_s, timeout_s=t.timeout_s,
                   engine_kwargs=dict(t.engine_kwargs))
