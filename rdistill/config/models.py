"""Typed configs for what the pipeline works on: teacher, student, sampling, domains and their data.

Model references are strings resolved by `rdistill.refs`: a local directory, a Hugging Face
model id, `toy:teacher` / `toy:base` (the toy world's models), `branch:<domain>` (a trained
branch student of this run), `merge:<name>` (a merge output of this run), or `base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rdistill.config.fields import ENGINE_DTYPES, fail, spec

BACKENDS = ["vllm", "openai", "dataset"]
ADAPTERS = ["livecodebench"]
FILTER_OPS = ("ge", "gt", "le", "lt", "in", "not_in")
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
class EngineConfig:
    """How a vLLM engine loads a model: one section, wherever an engine runs (the teacher,
    evaluation and the merge search, serving)."""
    dtype: str = spec("bfloat16", choices=ENGINE_DTYPES)
    """Weight dtype (auto: the checkpoint's)."""
    max_model_len: Optional[int] = spec(None, gt=0)
    """Context length the engine is built for, prompt + completion (None: for students, the
    student's max_model_len; for the teacher, the model's own)."""
    tensor_parallel_size: int = spec(1, ge=1)
    """GPUs per pipeline stage (vLLM tensor parallel degree); CPU engines use 1."""
    pipeline_parallel_size: int = spec(1, ge=1)
    """Pipeline stages (vLLM pipeline parallel degree)."""
    cpu_kvcache_gib: Optional[int] = spec(None, ge=1)
    """KV cache of a CPU engine in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE, set in the engine's own
    runtime env wherever it runs). None: the driver's VLLM_CPU_KVCACHE_SPACE (a job's
    `--runtime-env-json` env_vars reach it), else 1. GPU engines size their cache with
    engine_kwargs.gpu_memory_utilization instead."""
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra vLLM engine arguments, passed through unchanged (e.g. max_num_seqs)."""


@dataclass
class TeacherConfig:
    name: str = "toy-teacher"
    """Name recorded with every generated row (and shown in the report)."""
    backend: str = spec("vllm", choices=BACKENDS)
    """`vllm`: an engine hosted by Ray Data; `openai`: any OpenAI-compatible HTTP endpoint;
    `dataset`: no model runs, every domain's existing traces are imported from its sources
    (`domains.<d>.train.traces`), one row per trace, as a live teacher would have written them."""
    model: str = "toy:teacher"
    """Model reference for the vllm backend, or the model name sent to the endpoint (the dataset
    backend only records it)."""
    import_traces: bool = False
    """Live backends (vllm, openai): import the traces of domains whose sources declare them and
    generate only the other domains (false: regenerate every domain). The dataset backend always
    imports and needs traces on every domain."""
    tokenizer: Optional[str] = None
    """Model reference whose tokenizer counts imported traces' tokens (None: the student base's,
    the budget SFT cuts at)."""
    base_url: Optional[str] = None
    """Endpoint for the openai backend, e.g. https://api.deepseek.com/v1 (no trailing path)."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """Environment variable holding the API key; the key itself never goes in a config file."""
    qps: Optional[float] = spec(None, gt=0)
    """Request rate cap for the openai backend (None: unlimited)."""
    max_in_flight: int = spec(64, gt=0)
    """Most requests the openai backend holds open at once, over all replicas (also bounded by
    qps): a reasoning model answers in minutes, so throughput is qps-bound only with hundreds open."""
    max_retries: int = spec(6, ge=0)
    """Retries per request on 429, 5xx, timeouts and malformed bodies, with exponential backoff."""
    retry_wait_s: float = spec(1.0, gt=0)
    """First backoff wait of the openai backend's retries (doubles on each retry)."""
    timeout_s: float = spec(600.0, gt=0)
    """Per-request timeout for the openai backend."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_model_len=1024))
    """The vllm backend's engine (its max_model_len also bounds prompts for the openai backend)."""
    replicas: int = spec(1, ge=1)
    """Engine replicas (or HTTP workers) Ray Data runs concurrently."""
    batch_size: int = spec(16, gt=0)
    """Rows per batch sent to one engine or HTTP worker."""


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
    shape: Dict[str, int] = field(default_factory=dict)
    """The model's config.json sizes (hidden_size, num_hidden_layers, vocab_size,
    intermediate_size) for the dry run's activation and loss memory when the model is neither on
    disk nor in the Hugging Face cache ({}: read them from the model's config)."""


@dataclass
class TracesConfig:
    """Where a source keeps existing teacher traces (imported instead of generated): either
    `reasoning` + `answer` columns, or a `generations` column of whole completions."""
    reasoning: Optional[str] = None
    """Column with the teacher's reasoning (text, or a list of texts that are joined), e.g.
    OpenThoughts' deepseek_reasoning; the row's completion is `<think>reasoning</think>answer`."""
    answer: Optional[str] = None
    """Column with the answer written after the reasoning (OpenThoughts' deepseek_solution)."""
    generations: Optional[str] = None
    """Column with whole completions, `<think>` included: a list (one row per trace, OpenR1's
    generations) or one text."""
    correct: Optional[str] = None
    """Per-generation correctness flags (a list beside `generations`, e.g. OpenR1's
    correctness_math_verify) or one flag; traces flagged false are not imported."""
    complete: Optional[str] = None
    """Per-generation completeness flags (OpenR1's is_reasoning_complete); false means the trace
    was cut (finish reason length)."""
    finish_reasons: Optional[str] = None
    """Per-generation finish reasons (a list, or one string): stop or length; unknown ones are
    inferred (a closed </think> followed by an answer is stop)."""
    keep_incorrect: bool = False
    """Import traces flagged incorrect too (the verify stage still judges them)."""

    def validate(self, prefix: str) -> None:
        cols = {k: getattr(self, k) for k in ("reasoning", "answer", "generations") if getattr(self, k)}
        pair = self.reasoning is not None or self.answer is not None
        if pair == (self.generations is not None):
            fail(prefix.rstrip("."), cols, "set either generations (whole completions) or reasoning + answer")
        if pair and (self.reasoning is None or self.answer is None):
            fail(prefix.rstrip("."), cols, "reasoning and answer go together: set both columns")


@dataclass
class SourceConfig:
    path: Optional[str] = None
    """Local JSONL or parquet file, or `toy:<domain>/<split>` for the toy world's files."""
    hf_name: Optional[str] = None
    """Hugging Face dataset name (used when `path` is unset)."""
    hf_subset: Optional[str] = None
    """Hugging Face dataset config/subset name."""
    split: str = "train"
    """Dataset split to read (Hugging Face sources; `train` when data_files are named)."""
    data_files: List[str] = field(default_factory=list)
    """Files of the Hugging Face dataset repository to read (e.g. LiveCodeBench's test*.jsonl,
    whose loading script `datasets` no longer runs); empty: the dataset's own configuration."""
    fields: Dict[str, str] = field(default_factory=dict)
    """Map from rdistill's column names (id, prompt, gold, tests) to the source's column names."""
    filter: Dict[str, Any] = field(default_factory=dict)
    """Keep rows whose column matches: a value (equals), a list (one of), or a range/set as a
    map of ge, gt, le, lt, in, not_in; bounds compare as numbers, or as dates when they are ISO
    dates (e.g. {contest_date: {ge: "2024-08-01", lt: "2025-02-01"}}). A column the source lacks,
    or a filter that keeps nothing, stops the run."""
    limit: Optional[int] = spec(None, gt=0)
    """Use at most this many records (None: all)."""
    choices: List[str] = field(default_factory=list)
    """Columns holding a multiple-choice item's options, the correct one first (e.g. GPQA's
    'Correct Answer', 'Incorrect Answer 1..3'): options are shuffled (seeded by the record id)
    into A-D under the question, and gold becomes the correct letter."""
    expected_rows: Optional[int] = spec(None, gt=0)
    """Records the source yields after filters and limit: the dry run's estimate without a
    download, and a check when it is loaded (off by more than expected_tolerance: the run stops)."""
    expected_tolerance: float = spec(0.05, ge=0.0, le=1.0)
    """Relative difference from expected_rows accepted (dataset revisions move counts a little)."""
    traces: Optional[TracesConfig] = None
    """Columns holding existing teacher traces: the domain is imported instead of generated
    (teacher=dataset, or a live teacher with import_traces=true)."""
    adapter: Optional[str] = spec(None, choices=ADAPTERS)
    """Dataset-specific records: `livecodebench` puts the starter code into the prompt and packs
    public and private tests (LeetCode problems call-based) the way lcb_runner runs them."""
    name: Optional[str] = None
    """Name of an extra test set (`extra_test`): evaluated and reported as `<domain>/<name>`."""
    exclude_test: bool = False
    """Drop records whose id or prompt is in one of the domain's test sets, so a dev set drawn from
    the test's own dataset is disjoint from it by construction (GPQA main minus Diamond)."""
    eval_samples: Optional[int] = spec(None, gt=0)
    """Samples per prompt when this source is evaluated (None: the domain's eval_samples)."""

    def label(self) -> str:
        return self.name or self.path or f"{self.hf_name}{'/' + self.hf_subset if self.hf_subset else ''}"

    def validate(self, prefix: str) -> None:
        if self.path is None and self.hf_name is None:
            fail(prefix.rstrip("."), None, "set path (a JSONL/parquet file) or hf_name (a Hugging Face dataset)")
        for col, rule in self.filter.items():
            if isinstance(rule, dict):
                bad = sorted(set(map(str, rule)) - set(FILTER_OPS))
                if bad or not rule:
                    fail(f"{prefix}filter.{col}", rule, "a range or set uses the keys " + ", ".join(FILTER_OPS))


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
    extra_test: List[SourceConfig] = field(default_factory=list)
    """More evaluation sets of this domain, each with a `name` (e.g. aime25, math500), scored with
    the domain's verifier and reported as their own columns `<domain>/<name>`."""
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

    def validate(self, prefix: str) -> None:
        names = [s.name for s in self.extra_test]
        for i, n in enumerate(names):
            if not n or "/" in n or n in names[:i]:
                fail(f"{prefix}extra_test[{i}].name", n, "give each extra test set a unique name without '/'")

