"""Typed configs for what the pipeline works on: teacher, student, sampling, domains and their data.

Model references are strings resolved by `rdistill.refs`: a local directory, a Hugging Face
model id, `toy:teacher` / `toy:base` (the toy world's models), `branch:<domain>` (a trained
branch student of this run), `merge:<name>` (a merge output of this run), or `base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rdistill.config.fields import fail, spec

BACKENDS = ["vllm", "openai"]
DOMAIN_KINDS = ["math", "code", "science"]


@dataclass
class SamplingConfig:
    temperature: float = spec(0.6, ge=0.0)
    """Sampling temperature (DeepSeek-R1's recommended 0.6)."""
    top_p: float = spec(0.95, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = spec(512, gt=0)
    """Most tokens generated per sample; a sample that hits it is incomplete (finish reason length)."""
    n: int = spec(1, gt=0)
    """Samples per prompt."""
    seed: int = 0
    """Base seed; sample i of a prompt uses a seed derived from this, the prompt id and i."""


@dataclass
class TeacherConfig:
    name: str = "toy-teacher"
    """Name recorded with every generated row (and shown in the report)."""
    backend: str = spec("vllm", choices=BACKENDS)
    """`vllm`: an engine hosted by Ray Data; `openai`: any OpenAI-compatible HTTP endpoint."""
    model: str = "toy:teacher"
    """Model reference for the vllm backend, or the model name sent to the endpoint."""
    base_url: Optional[str] = None
    """Endpoint for the openai backend, e.g. https://api.deepseek.com/v1 (no trailing path)."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """Environment variable holding the API key; the key itself never goes in a config file."""
    qps: Optional[float] = spec(None, gt=0)
    """Request rate cap for the openai backend (None: unlimited)."""
    max_retries: int = spec(6, ge=0)
    """Retries per request on 429, 5xx, timeouts and malformed bodies, with exponential backoff."""
    retry_wait_s: float = spec(1.0, gt=0)
    """First backoff wait of the openai backend's retries (doubles on each retry)."""
    timeout_s: float = spec(600.0, gt=0)
    """Per-request timeout for the openai backend."""
    tensor_parallel_size: int = spec(1, ge=1)
    """vLLM tensor parallel degree (GPUs per pipeline stage)."""
    pipeline_parallel_size: int = spec(1, ge=1)
    """vLLM pipeline parallel degree."""
    replicas: int = spec(1, ge=1)
    """Engine replicas Ray Data runs concurrently."""
    max_model_len: int = spec(1024, gt=0)
    """Context length the engine is built for (prompt + completion)."""
    dtype: str = spec("bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    """Engine weight dtype."""
    batch_size: int = spec(16, gt=0)
    """Rows per batch sent to one engine or HTTP worker."""
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra vllm engine arguments, passed through unchanged."""


@dataclass
class StudentConfig:
    name: str = "toy-student"
    """Short name used for the base row of the report."""
    base: str = "toy:base"
    """Model reference every branch starts from (the reference recipe: DeepSeek-R1-Distill-Qwen-32B)."""
    max_model_len: int = spec(1024, gt=0)
    """Context length used when the student is evaluated or served."""
    params_b: Optional[float] = spec(None, gt=0)
    """Parameter count in billions, for the dry run's memory and disk estimates when the model
    is not on local disk (None: read it from the model's config)."""


@dataclass
class SourceConfig:
    path: Optional[str] = None
    """Local JSONL or parquet file, or `toy:<domain>/<split>` for the toy world's files."""
    hf_name: Optional[str] = None
    """Hugging Face dataset name (used when `path` is unset)."""
    hf_subset: Optional[str] = None
    """Hugging Face dataset config/subset name."""
    split: str = "train"
    """Dataset split to read (Hugging Face sources)."""
    fields: Dict[str, str] = field(default_factory=dict)
    """Map from rdistill's column names (id, prompt, gold, tests) to the source's column names."""
    filter: Dict[str, Any] = field(default_factory=dict)
    """Keep only rows whose column equals the value (e.g. {domain: science} for a mixed set)."""
    limit: Optional[int] = spec(None, gt=0)
    """Use at most this many records (None: all)."""
    choices: List[str] = field(default_factory=list)
    """Columns holding a multiple-choice item's options, the correct one first (e.g. GPQA's
    'Correct Answer', 'Incorrect Answer 1..3'): options are shuffled (seeded by the record id)
    into A-D under the question, and gold becomes the correct letter."""
    expected_rows: Optional[int] = spec(None, gt=0)
    """Known size of a remote source, used by the dry run's estimates without downloading it."""

    def validate(self, prefix: str) -> None:
        if self.path is None and self.hf_name is None:
            fail(prefix.rstrip("."), None, "set path (a JSONL/parquet file) or hf_name (a Hugging Face dataset)")


@dataclass
class DomainConfig:
    kind: str = spec("math", choices=DOMAIN_KINDS)
    """Which verifier scores this domain's answers."""
    train: SourceConfig = field(default_factory=SourceConfig)
    """Prompts the teacher answers to build this domain's SFT set."""
    dev: Optional[SourceConfig] = None
    """Held-out prompts that score merge candidates."""
    test: Optional[SourceConfig] = None
    """Evaluation prompts of the final table."""
    system_prompt: Optional[str] = None
    """System message sent with every prompt of this domain."""
    instruction_suffix: str = ""
    """Appended to each prompt, e.g. 'Please reason step by step, and put your final answer within \\boxed{}.'"""
    extra_train: List[SourceConfig] = field(default_factory=list)
    """More prompt sources appended to `train` (e.g. s1K beside OpenThoughts science)."""
    require_correct: bool = True
    """Drop samples the verifier rejects; false keeps every complete, well-formatted sample (for
    sources without checkable gold, as the reference recipe's science traces)."""
    eval_samples: Optional[int] = spec(None, gt=0)
    """Samples per prompt when evaluating this domain (None: eval.sampling.n), e.g. 16 for AIME."""
    train_overrides: Dict[str, Any] = field(default_factory=dict)
    """Per-branch overrides of the `train` section (epochs, lr, scheduler, ...), as in the reference recipe."""
    language: str = "python"
    """Programming language of code answers (code domains)."""

