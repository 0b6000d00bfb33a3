"""Typed configs of the stages: generate, verify, train, merge, evaluate, serve, and the toy world."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rdistill.config.fields import fail, spec
from rdistill.config.models import SamplingConfig

MERGE_METHODS = ["arcee_fusion", "ties", "dare_ties", "dare_linear", "task_arithmetic",
                 "linear", "slerp", "model_stock"]
SCHEDULERS = ["constant_with_warmup", "cosine", "linear", "constant"]


@dataclass
class ToyConfig:
    seed: int = 0
    """Seed of the toy world: domain problems, tokenizer and models are deterministic given it."""
    n_train: int = spec(400, gt=0)
    """Training prompts per domain (the teacher answers these)."""
    n_dev: int = spec(40, gt=0)
    """Dev prompts per domain (merge selection)."""
    n_test: int = spec(100, gt=0)
    """Test prompts per domain (the final table)."""
    rebuild: bool = False
    """Rebuild the teacher and base from scratch instead of using the models shipped in the package."""


@dataclass
class GenerateConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Teacher sampling settings."""
    on_bad_record: str = spec("skip", choices=["skip", "fail"])
    """Records with a missing or empty prompt, or one longer than the context: count and skip, or stop."""
    max_error_share: float = spec(0.05, ge=0.0, le=1.0)
    """The stage fails if more than this share of requests still fail after retries."""
    block_rows: int = spec(64, gt=0)
    """Rows per input block; a killed run repeats at most the blocks in flight."""
    probe_prompts: int = spec(2, ge=0)
    """Prompts answered first to check the teacher's <think>...</think> format before the full
    run spends tokens (0: no probe)."""


@dataclass
class SandboxConfig:
    timeout_s: float = spec(5.0, gt=0)
    """Wall-clock limit per program."""
    cpu_s: int = spec(4, gt=0)
    """CPU-time limit (RLIMIT_CPU)."""
    memory_mb: int = spec(512, gt=0)
    """Address-space limit (RLIMIT_AS)."""
    max_procs: int = spec(32, gt=0)
    """Process-count limit (RLIMIT_NPROC, enforced after dropping to an unprivileged uid)."""
    max_output_bytes: int = spec(65536, gt=0)
    """Stdout/stderr kept per program; the rest is cut."""
    busy_retries: int = spec(2, ge=0)
    """Reruns of a program that hit the wall-clock limit while it waited for a busy machine's
    CPU (little CPU used, long run-queue waits), each with twice the wall time; still blocked
    after them, it is recorded as an infrastructure failure, never as a wrong answer."""
    python: Optional[str] = None
    """Interpreter that runs the programs (None: the one running rdistill). Its folders are
    mounted read-only into the sandbox wherever they live (a venv under /tmp, a 0700 parent)."""


@dataclass
class VerifyConfig:
    max_completion_tokens: int = spec(4096, gt=0)
    """Token budget: longer answers are dropped."""
    near_dup_threshold: float = spec(0.9, gt=0.0, le=1.0)
    """Jaccard similarity of completion shingles at or above which a sample is a near-duplicate."""
    decontam_ngram: int = spec(13, gt=0)
    """N-gram size (words) for overlap with dev/test prompts; one shared n-gram drops the prompt."""
    max_samples_per_prompt: Optional[int] = spec(None, gt=0)
    """Keep at most this many verified samples per prompt (None: all)."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Limits of the code sandbox."""


@dataclass
class TrainConfig:
    num_workers: int = spec(2, ge=1)
    """Ray Train workers (data-parallel ranks) per branch."""
    cpus_per_worker: float = spec(1.0, gt=0)
    """CPUs each worker reserves."""
    gpus_per_worker: float = spec(0.0, ge=0)
    """GPUs each worker reserves (0 on CPU machines)."""
    zero_stage: int = spec(2, choices=[0, 1, 2, 3])
    """DeepSpeed ZeRO stage."""
    precision: str = spec("auto", choices=["auto", "bf16", "fp32"])
    """auto: bf16 on GPUs, fp32 on CPUs (CPU bf16 matmuls are slow without AMX)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    epochs: float = spec(1.0, gt=0)
    """Passes over the SFT set."""
    max_steps: Optional[int] = spec(None, gt=0)
    """Stop after this many optimizer steps (None: epochs decide)."""
    lr: float = spec(1e-5, gt=0)
    """Peak learning rate."""
    warmup_ratio: float = spec(0.1, ge=0.0, le=1.0)
    """Share of steps spent warming up linearly."""
    scheduler: str = spec("constant_with_warmup", choices=SCHEDULERS)
    """Learning-rate schedule after warm-up."""
    adam_beta1: float = spec(0.9, ge=0.0, le=1.0)
    """AdamW beta1."""
    adam_beta2: float = spec(0.95, ge=0.0, le=1.0)
    """AdamW beta2."""
    adam_eps: float = spec(1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = spec(0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = spec(1.0, gt=0)
    """Gradient norm clip."""
    micro_batch_size: int = spec(1, ge=1)
    """Sequences (packed rows) per device per micro-step."""
    grad_accum: int = spec(1, ge=1)
    """Micro-steps per optimizer step."""
    max_len: int = spec(16384, gt=0)
    """Longest training sequence; longer samples are dropped and counted, never truncated."""
    packing: bool = True
    """Pack samples into rows of max_len with per-sample attention (neat packing)."""
    chat_template: Optional[str] = None
    """Template that renders SFT samples: a bundled name (r1_distill_keep_reasoning) or a .jinja
    path; None: the student's own. DeepSeek-R1-Distill's own template drops the <think> reasoning
    from assistant turns, so its presets set r1_distill_keep_reasoning."""
    checkpoint_every: int = spec(50, ge=1)
    """Optimizer steps between checkpoints."""
    max_failures: int = spec(2, ge=0)
    """Worker failures Ray Train recovers from (resuming from the last checkpoint)."""
    seed: int = 42
    """Seed of data order and initialisation."""


@dataclass
class MergeModelConfig:
    model: str = "base"
    """Model reference (branch:<domain>, merge:<step>, base, a path or HF id)."""
    parameters: Dict[str, Any] = field(default_factory=dict)
    """Per-model parameters with mergekit's names (weight, density, ...)."""


@dataclass
class MergeStepConfig:
    name: str = "merged"
    """Name of this step's output; later steps refer to it as merge:<name>."""
    merge_method: str = spec("arcee_fusion", choices=MERGE_METHODS)
    """Merge method (mergekit's names)."""
    base_model: Optional[str] = None
    """Base model reference (task-vector methods, arcee_fusion, slerp)."""
    models: List[MergeModelConfig] = field(default_factory=list)
    """Models merged in this step."""
    parameters: Dict[str, Any] = field(default_factory=dict)
    """Global parameters with mergekit's names (lambda, normalize, t, density, ...)."""
    dtype: str = spec("bfloat16", choices=["bfloat16", "float16", "float32"])
    """Dtype the merge computes in."""
    out_dtype: Optional[str] = spec(None, choices=["bfloat16", "float16", "float32"])
    """Dtype of the written tensors (None: dtype)."""

    def validate(self, prefix: str) -> None:
        if not self.models:
            fail(prefix + "models", [], "list at least one model")


@dataclass
class MergeCandidateConfig:
    name: str = "fusion"
    """Candidate name shown in the report."""
    steps: List[MergeStepConfig] = field(default_factory=list)
    """Merge steps in order; the last step's output is the candidate."""

    def validate(self, prefix: str) -> None:
        if not self.steps:
            fail(prefix + "steps", [], "list at least one merge step")


@dataclass
class MergeConfig:
    candidates: List[MergeCandidateConfig] = field(default_factory=list)
    """Merge candidates; with more than one, the evaluate stage picks the best on the dev split."""
    objective: str = spec("mean", choices=["mean", "min"])
    """How domain scores combine when choosing among candidates."""
    shard_size_mb: int = spec(1024, gt=0)
    """Output safetensors shard size."""
    num_tasks: Optional[int] = spec(None, gt=0)
    """Concurrent merge tasks (None: one per available CPU)."""


@dataclass
class EvalConfig:
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4))
    """Sampling of evaluation answers (reference protocol: temperature 0.6, top-p 0.95)."""
    include_teacher: bool = True
    """Evaluate the teacher too (when it is a local model or a reachable endpoint)."""
    max_prompts: Optional[int] = spec(None, gt=0)
    """Evaluate at most this many prompts per domain (None: all)."""
    batch_size: int = spec(32, gt=0)
    """Rows per engine batch."""
    concurrency: Optional[int] = spec(None, gt=0)
    """Models scored at once, one engine each (None: as many as the cluster's CPUs, or GPUs,
    hold; on a few-core machine 1-2 is faster, since engines share the cores)."""
    tensor_parallel_size: int = spec(1, ge=1)
    """GPUs per evaluation engine (vLLM tensor parallel degree): a 32B student in bf16 is 66 GB,
    so one 80 GB GPU leaves almost no room for 32k-token KV caches; CPU engines use 1."""


@dataclass
class ServeConfig:
    model: str = "merged"
    """What to serve: merged (the run's chosen merge), a model reference or a path."""
    served_name: Optional[str] = None
    """Model name clients send (None: the run's name)."""
    min_replicas: int = spec(1, ge=1)
    """Autoscaling lower bound."""
    max_replicas: int = spec(1, ge=1)
    """Autoscaling upper bound."""
    port: int = spec(8000, gt=0, le=65535)
    """HTTP port of the OpenAI-compatible API."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds."""
    api_key_env: Optional[str] = None
    """Environment variable holding the API key clients must send (None: no auth)."""
    max_model_len: int = spec(1024, gt=0)
    """Engine context length."""
    blocking: bool = True
    """Serve in the foreground until interrupted (false: deploy and return)."""
    dtype: str = spec("bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    """Engine weight dtype."""
    tensor_parallel_size: int = spec(1, ge=1)
    """GPUs per replica (vLLM tensor parallel degree); CPU replicas use 1."""
    reasoning_parser: Optional[str] = "deepseek_r1"
    """vLLM reasoning parser that splits <think> reasoning into `reasoning_content` (None: off)."""
    target_ongoing_requests: int = spec(16, gt=0)
    """Autoscaling target: in-flight requests per replica before Serve adds one."""
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra vLLM engine arguments, passed through unchanged (e.g. max_num_seqs)."""

    def validate(self, prefix: str) -> None:
        if self.max_replicas < self.min_replicas:
            fail(prefix + "max_replicas", self.max_replicas, f"must be >= min_replicas ({self.min_replicas})")
