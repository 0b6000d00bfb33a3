"""Typed configs of the stages: generate, verify, train, merge, evaluate, serve, and the toy world."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rdistill.config.distill import KDConfig
from rdistill.config.fields import DTYPES, MERGE_METHODS, fail, spec
from rdistill.config.models import EngineConfig, SamplingConfig

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
    """A branch's budget: passes over its own SFT set (packed rows), the same meaning for every
    domain whatever its sample lengths."""
    max_steps: Optional[int] = spec(None, gt=0)
    """Stop after this many optimizer steps (None: epochs decide); an override, e.g. for tests."""
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
    loss_chunk_tokens: int = spec(4096, ge=0)
    """Tokens per chunk of the cross-entropy over the vocabulary: the [tokens, vocab] logits are
    never built whole (a 16k-token row over Qwen's 152k vocabulary is ~10 GB in fp32); each
    chunk's logits are recomputed in backward. Liger's fused kernel replaces it on GPUs where
    installed (extra `liger`). 0: the full logits (only for equality tests)."""
    sequence_parallel_size: int = spec(1, ge=1)
    """Workers that share one packed row (Ulysses sequence parallelism through DeepSpeed: each
    holds 1/n of the row's tokens and activations; attention swaps the split to the heads).
    Must divide num_workers and the student's attention heads; data-parallel replicas are
    num_workers / sequence_parallel_size. For 32k-token rows of a 32B student."""
    tokenize_with_ray_data: Optional[bool] = None
    """Tokenize and pack the SFT set as a Ray Data job across the cluster (memory-mapped rows
    written in parallel) instead of in the driver; None: when the SFT files hold 256 MB or more."""

    def validate(self, prefix: str) -> None:
        if self.num_workers % self.sequence_parallel_size:
            fail(prefix + "sequence_parallel_size", self.sequence_parallel_size,
                 f"must divide num_workers ({self.num_workers}): each group of workers shares one row")
    chat_template: Optional[str] = None
    """Template that renders SFT samples: a bundled name (r1_distill_keep_reasoning) or a .jinja
    path; None: the student's own. DeepSeek-R1-Distill's own template drops the <think> reasoning
    from assistant turns, so its presets set r1_distill_keep_reasoning."""
    checkpoint_every: int = spec(50, ge=1)
    """Optimizer steps between checkpoints."""
    save_steps: List[int] = field(default_factory=list)
    """Also write the model as it is after these optimizer steps, as HF directories
    <out>/snapshots/step-<n> (the toy world's student base is one of its teacher's)."""
    max_failures: int = spec(2, ge=0)
    """Worker failures Ray Train recovers from (resuming from the last checkpoint)."""
    seed: int = 42
    """Seed of data order and initialisation."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Offline top-k logit distillation added to the SFT loss (off at weight 0)."""
    concurrent: Optional[int] = spec(None, ge=1)
    """Trainings (the branches and the mixture) at once. None: as many as the cluster's resources
    hold, except on CPUs, whose logical CPUs outnumber their cores (Ray Data's light stages need
    them): there, as many as the nodes' cores hold at num_workers x cpus_per_worker each, since
    DeepSpeed ranks that share a core wait for each other at every all-reduce (on 2 cores the
    toy's four trainings took 378 s side by side, 324 s one after another)."""
    mixture_baseline: bool = False
    """Also train one student on the union of every domain's SFT set, seeing each domain's samples
    as often as that domain's branch does (the same tokens per domain; the `mixture` row of the
    table): the baseline that answers whether Branch-Merge beats simply training on everything."""


@dataclass
class MergeModelConfig:
    model: str = "base"
    """Model reference (branch:<domain>, merge:<step>, base, a path or HF id)."""
    parameters: Dict[str, Any] = field(default_factory=dict)
    """Per-model parameters with mergekit's names (weight, density, ...)."""
    data: Optional[str] = None
    """Chat SFT JSONL of this model's domain, for the methods that need its inputs (regmean,
    regmean_plusplus); None: a branch:<domain> model's verified SFT set (verify/<domain>.jsonl)."""


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
    dtype: str = spec("bfloat16", choices=DTYPES)
    """Dtype the merge computes in."""
    out_dtype: Optional[str] = spec(None, choices=DTYPES)
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


SEARCH_METHODS = ["task_arithmetic", "ties", "dare_ties", "arcee_fusion", "linear", "model_stock"]
SEARCH_METHODS += ["tsv_m", "iso_c", "iso_cts"]  # the spectral merges (rdistill/merge/spectral.py)
SEARCH_METHODS += ["regmean", "regmean_plusplus"]  # fit to each branch's layer inputs (rdistill/merge/regmean.py)
SEARCH_CANDIDATE = "search"  # the search's chosen merge: merge/search/final, merge:search


@dataclass
class MergeSearchConfig:
    enabled: bool = False
    """Search merge recipes on the dev split (a candidate named `search` beside the fixed ones)."""
    methods: List[str] = spec(default_factory=lambda: list(SEARCH_METHODS), choices=SEARCH_METHODS)
    """Methods searched: arcee_fusion means Fusion chains in every order of the branches."""
    weights: List[float] = field(default_factory=lambda: [0.5, 0.7, 0.85, 1.0])
    """Values each branch's weight is drawn from (task_arithmetic, ties, dare_ties, and the spectral
    tsv_m, iso_c, iso_cts, whose weights scale each branch's task vector; for regmean and
    regmean_plusplus a coefficient on the branch's Gram matrices)."""
    layer_groups: int = spec(1, ge=1)
    """Weights per branch in the seeded draws: 1, one weight for all of a branch's tensors; G > 1,
    G weights drawn from `weights`, mergekit's gradient over the layers (G anchors evenly spaced
    from the first layer to the last, linear in between; the embeddings, final norm and LM head
    take the first), so that a branch can weigh more in some layers than in others."""
    densities: List[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    """Values the kept share is drawn from (ties, dare_ties)."""
    lambdas: List[float] = field(default_factory=lambda: [1.0])
    """Values the scaling of the merged task vector is drawn from (ties, dare_ties, tsv_m, iso_c,
    iso_cts)."""
    common_space_fractions: List[float] = field(default_factory=lambda: [0.8])
    """Values Iso-CTS's common-space share of each layer's rank is drawn from (iso_cts; 0.8 is the
    paper's)."""
    ratios: List[float] = field(default_factory=lambda: [0.95, 0.9, 0.8])
    """Values RegMean's off-diagonal scaling alpha (reduce_non_diagonal_ratio) is drawn from
    (regmean, regmean_plusplus; the first is the uniform baseline's)."""
    candidates: int = spec(24, gt=0)
    """Budget in candidates: every Fusion order, linear, model_stock, the spectral merges at their
    papers' settings, RegMean and RegMean++ with equal coefficients, then seeded draws of the
    weighted, spectral and RegMean methods up to this many."""
    first_prompts: int = spec(10, gt=0)
    """Dev prompts per domain every candidate is scored on (successive halving's first rung);
    each later rung scores the best 1/eta of the candidates on eta times as many, up to the
    whole dev split."""
    eta: int = spec(3, ge=2)
    """Successive halving's reduction factor."""
    samples: int = spec(2, gt=0)
    """Samples per dev prompt."""
    floor: str = spec("base", choices=["none", "base"])
    """base: a candidate below the student base on any domain (on dev) is never chosen."""
    refine_rounds: int = spec(0, ge=0)
    """After the halving, rounds of per-branch weight refinement when the choice is a weighted
    method: each round scores, on the whole dev split, the choice with one branch's weight one
    step up or down `weights` (up to two candidates per branch) and keeps the best; it stops
    early when no neighbour beats the choice. 0: none. Worth it when the dev split can tell a
    few points apart: on the toy's 80 dev prompts it rarely can."""
    seed: int = 0
    """Seed of the candidate draws."""

    def validate(self, prefix: str) -> None:
        bad = [f for f in self.common_space_fractions if not 0 <= f <= 1]
        if bad or not self.common_space_fractions:
            fail(prefix + "common_space_fractions", list(self.common_space_fractions),
                 "list shares of a layer's rank in [0, 1], e.g. [0.8]")
        if not self.ratios or any(not 0 <= r <= 1 for r in self.ratios):
            fail(prefix + "ratios", list(self.ratios), "list values in [0, 1]")
        if any(w <= 0 for w in self.weights) and any(m.startswith("regmean") for m in self.methods):
            fail(prefix + "weights", list(self.weights), "regmean's coefficients must be > 0")


@dataclass
class MergeStatsConfig:
    """What RegMean's input statistics are computed on: per linear layer and per model, the Gram
    matrix X^T X / n of the layer's inputs over a sample of that model's domain data."""
    samples: int = spec(256, gt=0)
    """SFT rows (prompt and answer) per domain (fusion-bench's num_regmean_examples)."""
    max_tokens: int = spec(1024, gt=0)
    """Tokens per row at most (longer rows are cut: the statistics need inputs, not answers)."""
    batch_size: int = spec(8, gt=0)
    """Rows per forward pass."""
    seed: int = 0
    """Seed of the draw of rows from each domain's set."""
    chat_template: Optional[str] = None
    """Template the rows are rendered with (bundled name or .jinja path); None: the train
    section's, the one the branches were trained with (else the model's own)."""
    memory_gb: float = spec(16.0, gt=0)
    """Gram matrices one collection task holds at once: a model whose matrices need more is
    collected in several passes over the rows, each for a group of layers (a 32B student's are
    ~216 GB per domain)."""


@dataclass
class MergeConfig:
    candidates: List[MergeCandidateConfig] = field(default_factory=list)
    """Merge candidates; with more than one, the evaluate stage picks the best on the dev split."""
    search: MergeSearchConfig = field(default_factory=MergeSearchConfig)
    """A budgeted search over merge recipes, scored on the dev split by warm engines."""
    stats: MergeStatsConfig = field(default_factory=MergeStatsConfig)
    """Input statistics of regmean and regmean_plusplus (collected once per branch and reused)."""
    objective: str = spec("mean", choices=["mean", "min", "weighted"])
    """How domain scores combine when choosing a merge: their mean, the worst domain, or a
    weighted mean (domain_weights)."""
    domain_weights: Dict[str, float] = field(default_factory=dict)
    """Weights of the domains for objective=weighted (missing domains weigh 0)."""
    shard_size_mb: int = spec(1024, gt=0)
    """Output safetensors shard size."""
    num_tasks: Optional[int] = spec(None, gt=0)
    """Concurrent merge tasks (None: one per available CPU)."""
    max_memory_gb: Optional[float] = spec(None, gt=0)
    """Memory budget of a merge's work in flight, in GB (2**30 bytes): inputs, outputs and the
    methods' buffers of the units running at once. A tensor too big for it is merged in row
    blocks; a budget too small for one row fails before any work, naming the smallest that
    works (None: half the node's available memory; the same as the CLI's --max-memory)."""

    def names(self) -> list[str]:
        """Every merge the run makes, in table order: the fixed candidates, then the search's."""
        return [c.name for c in self.candidates] + ([SEARCH_CANDIDATE] if self.search.enabled else [])

    def validate(self, prefix: str) -> None:
        if self.search.enabled and SEARCH_CANDIDATE in [c.name for c in self.candidates]:
            fail(prefix + "candidates", SEARCH_CANDIDATE, "the name 'search' is the search's own: rename the candidate")
        if self.objective == "weighted" and not any(w > 0 for w in self.domain_weights.values()):
            fail(prefix + "domain_weights", dict(self.domain_weights), "objective=weighted needs a positive weight")


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
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The students' evaluation engines (and the merge search's). tensor_parallel_size: a 32B
    student in bf16 is 66 GB, so one 80 GB GPU leaves almost no room for 32k-token KV caches."""
    warm_engines: bool = True
    """Load each next model of a family into running engines (false: a fresh engine per model,
    slower by one engine start per model; for comparison)."""


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
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Each replica's engine (tensor_parallel_size: GPUs per replica; max_model_len None: the
    student's)."""
    blocking: bool = True
    """Serve in the foreground until interrupted (false: deploy and return)."""
    reasoning_parser: Optional[str] = "deepseek_r1"
    """vLLM reasoning parser that splits <think> reasoning into `reasoning_content` (None: off)."""
    target_ongoing_requests: int = spec(16, gt=0)
    """Autoscaling target: in-flight requests per replica before Serve adds one."""

    def validate(self, prefix: str) -> None:
        if self.max_replicas < self.min_replicas:
            fail(prefix + "max_replicas", self.max_replicas, f"must be >= min_replicas ({self.min_replicas})")
