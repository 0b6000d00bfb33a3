"""What an LLM batch-inference run needs, shared by the generate and evaluate stages.

`rdistill.llm.batch.generate(ds, spec)` runs a Ray Dataset of chat rows through either a
vLLM engine hosted by Ray Data (`ray.data.llm`) or an OpenAI-compatible endpoint (Ray Data's
HTTP processor), and returns the rows with the model's answer added.

Input rows: `id` (str, unique), `messages` (list of {role, content}), optional `seed` (int),
plus any other columns, which are kept. Output rows add `completion` (str), `finish_reason`
(stop | length | error), `prompt_tokens`, `completion_tokens` (int) and `error` (str or None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rdistill.config import EngineConfig, SamplingConfig, TeacherConfig


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
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_model_len=1024))
    """The vLLM engine's settings (its max_model_len also bounds prompts for an endpoint)."""
    batch_size: int = 16
    replicas: int = 1
    base_url: Optional[str] = None
    api_key_env: Optional[str] = None
    qps: Optional[float] = None
    max_retries: int = 6
    retry_wait_s: float = 1.0
    """First backoff wait between retries (doubles each retry)."""
    timeout_s: float = 600.0
    max_in_flight: int = 64
    """Most requests an endpoint backend holds open at once, over all replicas."""

    def __post_init__(self) -> None:
        self.name = self.name or self.model

    @property
    def max_model_len(self) -> Optional[int]:
        return self.engine.max_model_len

    @classmethod
    def for_student(cls, cfg, name: str, path: str) -> "LLMSpec":
        """How a student model of the run (base, branch, merge) is sampled for evaluation: the
        eval engine, its context the student's unless set, one GPU share per engine on CPUs."""
        import dataclasses

        from rdistill.topology import eval_tensor_parallel
        engine = dataclasses.replace(cfg.eval.engine, tensor_parallel_size=eval_tensor_parallel(cfg),
                                     max_model_len=cfg.eval.engine.max_model_len or cfg.student.max_model_len)
        return cls(model=path, name=name, backend="vllm", device=cfg.device, sampling=cfg.eval.sampling,
                   engine=engine, batch_size=cfg.eval.batch_size)

    def engine_job(self, rows: list[dict]) -> dict:
        """A job for rdistill.llm.warm.WarmPool: this model, its engine arguments and sampling,
        and the rows' ids, chat messages and per-sample seeds."""
        from rdistill.llm.warm import engine_kwargs
        return {"model": self.model, "name": self.name, "kwargs": engine_kwargs(self.device, self.engine),
                "sampling": {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                             "max_tokens": self.sampling.max_tokens},
                "rows": [{"id": r["id"], "messages": r["messages"], "seed": r.get("seed")} for r in rows]}

    @classmethod
    def from_teacher(cls, t: TeacherConfig, model: str, sampling: SamplingConfig, device: str) -> "LLMSpec":
        """The teacher's settings (every field the two share by name) for one batch run."""
        from rdistill.config.fields import shared_fields
        return shared_fields(t, cls, model=model, device=device, sampling=sampling)
