"""Ray topology in one place: how rdistill joins or starts Ray, and what each stage asks of it.

Every stage takes its placement bundles, actor counts and task resources from here, so that
the dry-run plan and the real run agree, and moving from a laptop to a cluster is a config
change (device=gpu, tensor_parallel_size=8, num_workers=16), not a code change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from rdistill.config import EngineConfig, ExperimentConfig, RayConfig, TrainConfig, branch_train_config

log = logging.getLogger("rdistill")

# Small CPU stages (tokenize, detokenize, verifiers' bookkeeping) take a fraction of a CPU so
# that a 2-core laptop with a handful of logical CPUs never deadlocks on resource budgets.
LIGHT_CPU = 0.25


def local_num_cpus(rc: RayConfig) -> int:
    """Logical CPUs for a local cluster: Ray Data checkpointing and Serve's proxy and ingress
    need more logical CPUs than 2 cores (stack-notes); oversubscribing is fine for them."""
    return rc.num_cpus or max(8, os.cpu_count() or 1)


def vllm_ipc_dir() -> tuple[str, bool]:
    """(VLLM_RPC_BASE_PATH for this process and what it starts, whether this process owns it).
    vLLM binds several ZMQ sockets per engine in the temp folder and never unlinks them, even on a
    clean shutdown (thousands of stale sockets in /tmp after a day of runs). Unless the user set
    one, a folder is made, set in the environment (child processes inherit it) and removed when
    this process exits (a run's watchdog removes it too if the run is killed)."""
    if os.environ.get("VLLM_RPC_BASE_PATH"):
        return os.environ["VLLM_RPC_BASE_PATH"], False
    import atexit
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="rdistill-ipc-")
    atexit.register(shutil.rmtree, path, True)
    os.environ["VLLM_RPC_BASE_PATH"] = path
    return path, True


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(device: Optional[str] = None, engine: Optional[EngineConfig] = None) -> dict[str, str]:
    """Environment variables a process rdistill starts on the cluster needs: every task and worker
    imports rdistill (a checkout need not be installed; `ray job submit --working-dir` ships it
    too, and Ray prepends that path to this one); a vLLM engine on CPUs gets its KV cache size
    (else vLLM claims 92% of the node's memory and refuses to start next to anything else), and
    on one machine its IPC sockets go to the folder this run removes. One home for all of it, so
    a driver that joined a cluster, or was started by `ray job submit`, gives its engines
    what a local run does."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (_repo(), os.environ.get("PYTHONPATH", "")) if p),
           "TOKENIZERS_PARALLELISM": "false"}
    if engine is not None:
        env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
        if device == "cpu":
            kv = engine.cpu_kvcache_gib if engine.cpu_kvcache_gib is not None else \
                int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv)
        if os.environ.get("VLLM_RPC_BASE_PATH"):
            env["VLLM_RPC_BASE_PATH"] = os.environ["VLLM_RPC_BASE_PATH"]
    return env


def runtime_env(device: Optional[str] = None, engine: Optional[EngineConfig] = None) -> dict:
    """The `runtime_env` option of a task or actor rdistill starts (see `worker_env`). Ray merges
    it into the job's runtime env key by key, so a job's `--working-dir` and its own env_vars (API
    keys) stay; a key both set comes from here (config decides; worker_env reads the driver's
    environment, which a job's env_vars reach, when the config leaves it unset)."""
    return {"env_vars": worker_env(device, engine)}


def _job_env_vars() -> dict:
    """env_vars of the runtime env `ray job submit` gave this driver (empty otherwise)."""
    import json
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def init_ray(rc: RayConfig) -> dict:
    """Join a cluster (config address, or RAY_ADDRESS) or start a local one. Idempotent.
    The driver's own runtime env carries only what Ray Data's and Ray's own tasks need to import
    rdistill; engines and workers declare theirs where they start (`runtime_env`)."""
    import ray
    if ray.is_initialized():
        return ray.cluster_resources()
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if not address:  # one machine: every engine's sockets go where this process removes them
        vllm_ipc_dir()
    # Ray refuses a driver env_var that the submitted job's runtime env sets too: the job's wins.
    job = _job_env_vars()
    env = {"env_vars": {k: v for k, v in worker_env().items() if k not in job}}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        n = local_num_cpus(rc)
        log.info("starting a local Ray cluster with %d logical CPUs", n)
        ray.init(address="local", num_cpus=n, include_dashboard=rc.include_dashboard,
                 runtime_env=env, log_to_driver=True)
    from rdistill.log import capture_worker_output, requiet
    requiet()
    capture_worker_output()
    return ray.cluster_resources()


def joins_cluster(rc: RayConfig) -> bool:
    """Whether init_ray joins an existing cluster (whose nodes may not share this one's disks)."""
    return bool(rc.address or os.environ.get("RAY_ADDRESS")) and rc.address != "local"


def pinned_to_node(node_id: str) -> dict:
    """Options of a zero-CPU task that must run on one given node (per-node preflight checks)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return {"num_cpus": 0, "max_retries": 0, "runtime_env": runtime_env(),
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


def on_each_node(fn, *args, with_cpus: bool = False) -> dict:
    """`fn(*args)` as a zero-CPU Ray task pinned to each alive node (only the nodes with CPUs when
    `with_cpus`): {object ref: the node's ray.nodes() entry}, for per-node checks and questions."""
    import ray
    task = ray.remote(fn)
    nodes = [n for n in ray.nodes() if n.get("Alive") and (not with_cpus or n["Resources"].get("CPU", 0) > 0)]
    return {task.options(**pinned_to_node(n["NodeID"])).remote(*args): n for n in nodes}


def engine_placement(device: str, tp: int = 1, pp: int = 1) -> dict:
    """Placement bundles of one vLLM engine replica (Ray Data LLM, Serve LLM).
    Without explicit CPU bundles the engine asks for a GPU and waits forever on a CPU machine."""
    if device == "cpu":
        return {"bundles": [{"CPU": 1}], "strategy": "PACK"}
    return {"bundles": [{"GPU": 1, "CPU": 1}] * (tp * pp), "strategy": "PACK"}


def serve_resources(device: str, replicas: int, tp: int = 1) -> dict[str, float]:
    """What a Serve LLM app holds: per replica its engine bundles plus 1 CPU for the replica
    actor (Serve merges it into the first bundle), and 1 CPU for the OpenAI ingress."""
    out = _sum(engine_placement(device, tp)["bundles"], replicas)
    out["CPU"] = out.get("CPU", 0) + replicas + 1
    return out


def train_scaling(device: str, tc: TrainConfig) -> dict:
    """ScalingConfig keyword arguments of one branch's TorchTrainer."""
    use_gpu = device == "gpu"
    res: dict[str, float] = {"CPU": tc.cpus_per_worker}
    if use_gpu:
        res["GPU"] = tc.gpus_per_worker or 1
    return dict(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=res)


def train_concurrency(device: str, tc: TrainConfig, n_jobs: int) -> int:
    """Trainings the train stage runs at once (train.concurrent): on CPUs, as many as the nodes'
    cores hold (a DeepSpeed rank that shares its core with another training's stalls every
    all-reduce); on GPUs, all of them, and Ray queues what its resources do not hold."""
    if tc.concurrent:
        return max(1, min(n_jobs, tc.concurrent))
    if device != "cpu":
        return max(1, n_jobs)
    per = tc.num_workers * tc.cpus_per_worker
    return max(1, min(n_jobs, int(cluster_cores() // per)))


def _cores() -> int:
    return os.cpu_count() or 1


def cluster_cores() -> int:
    """Cores of the cluster's alive nodes (each node's os.cpu_count(), asked by a zero-CPU task
    pinned to it): Ray's CPU resource is a logical count and may be set above the cores."""
    import ray
    try:
        return sum(ray.get(list(on_each_node(_cores, with_cpus=True)), timeout=60))
    except Exception:  # noqa: BLE001 (a node that does not answer: assume this machine's size)
        return os.cpu_count() or 1


# Merge tasks on GPU machines share a GPU: a task streams a few tensors at a time, so several
# fit on one device and keep it busy while others read and write.
MERGE_TASKS_PER_GPU = 4


def merge_task_options(device: str) -> dict:
    """Ray remote options of one merge task (a unit of tensors, streamed one at a time).
    SPREAD: a merge is bound by disk reads and writes, so tasks on every node's disks and
    CPUs beat packing them onto the driver's node (the shards live on a shared path)."""
    return {"num_cpus": 1, "num_gpus": 1 / MERGE_TASKS_PER_GPU if device == "gpu" else 0,
            "scheduling_strategy": "SPREAD", "runtime_env": runtime_env()}


def stats_task_options(device: str) -> dict:
    """Ray remote options of one statistics task (RegMean's Grams: a model loaded once and run
    over its domain's rows): a whole GPU on GPU machines, one CPU otherwise."""
    return {"num_cpus": 1, "num_gpus": 1 if device == "gpu" else 0}


def verify_task_options() -> dict:
    """Ray remote options of one verification batch (the sandbox forks its own processes)."""
    return {"num_cpus": 1, "runtime_env": runtime_env()}


def eval_concurrency(cfg: ExperimentConfig, have: dict[str, Any], n_models: int) -> int:
    """How many models the evaluate stage scores at once (one Ray Data + vLLM pipeline each):
    as many engines as the cluster's CPUs (or GPUs) hold next to their light CPU stages and
    scorers, capped by eval.concurrency; at least 1 (Ray queues what does not fit)."""
    per = _sum(engine_placement(cfg.device, eval_tensor_parallel(cfg))["bundles"])
    per["CPU"] = per.get("CPU", 0) + 4 * LIGHT_CPU  # chat template, tokenize, detokenize, score
    fit = min(int(float(have.get(k, 0)) // v) for k, v in per.items() if v > 0)
    n = min(n_models, max(1, fit))
    return min(n, cfg.eval.concurrency) if cfg.eval.concurrency else n


def eval_tensor_parallel(cfg: ExperimentConfig) -> int:
    """GPUs per evaluation engine: eval.engine.tensor_parallel_size on GPUs, 1 on CPUs."""
    return cfg.eval.engine.tensor_parallel_size if cfg.device == "gpu" else 1


@dataclass
class StagePlan:
    stage: str
    resources: dict[str, float] = field(default_factory=dict)
    """Peak resources the stage asks for at once."""
    notes: list[str] = field(default_factory=list)


def _sum(bundles: list[dict], times: int = 1) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0) + v * times
    return out


def plan(cfg: ExperimentConfig) -> list[StagePlan]:
    """What each selected stage asks of the cluster (for the dry run and fit checks)."""
    t = cfg.teacher
    plans: list[StagePlan] = []
    for stage in cfg.stages:
        p = StagePlan(stage)
        if stage == "generate":
            if t.backend == "vllm":
                e = t.engine
                b = engine_placement(cfg.device, e.tensor_parallel_size, e.pipeline_parallel_size)["bundles"]
                p.resources = _sum(b, t.replicas)
                p.resources["CPU"] = p.resources.get("CPU", 0) + 3 * LIGHT_CPU
                p.notes.append(f"{t.replicas} vLLM replica(s) of {t.model}, tp={e.tensor_parallel_size} "
                               f"pp={e.pipeline_parallel_size}")
            elif t.backend == "dataset":
                p.resources = {"CPU": 1}
                p.notes.append("imports the teacher's traces from the domains' sources (no model runs)")
            else:
                p.resources = {"CPU": 1 + LIGHT_CPU}
                p.notes.append(f"HTTP teacher {t.model} at {t.base_url} (qps={t.qps})")
        elif stage == "train":
            peak: dict[str, float] = {}
            for dom in cfg.domains:
                tc = branch_train_config(cfg, dom)
                s = train_scaling(cfg.device, tc)
                per = _sum([s["resources_per_worker"]], s["num_workers"])
                p.notes.append(f"branch {dom}: {tc.num_workers} worker(s) x {s['resources_per_worker']}, "
                               f"ZeRO-{tc.zero_stage}, epochs={tc.epochs}, lr={tc.lr}, max_len={tc.max_len}")
                # One branch at a time is what the stage needs to make progress; Ray starts the
                # others concurrently when the cluster has room for them too.
                peak = {k: max(v, peak.get(k, 0)) for k, v in per.items()}
                all_at_once = {k: v * len(cfg.domains) for k, v in per.items()}
            p.resources = peak
            if cfg.train.kd.weight > 0:
                from rdistill.data.packing import kd_bytes_per_token
                k = cfg.train.kd.top_k
                p.notes.append(f"logit KD: {cfg.train.kd.teacher or cfg.teacher.model}'s top-{k} logprobs stored at "
                               f"every loss token, {kd_bytes_per_token(k)} bytes per token (int32 ids + float16 logprobs), "
                               f"KL weight {cfg.train.kd.weight} at temperature {cfg.train.kd.temperature}")
            p.notes.append("branches run concurrently when the cluster holds "
                           + ", ".join(f"{k}={v:g}" for k, v in all_at_once.items()) + ", else queue")
        elif stage == "serve":
            p.resources = serve_resources(cfg.device, cfg.serve.min_replicas, cfg.serve.engine.tensor_parallel_size)
            p.notes.append(f"{cfg.serve.min_replicas}-{cfg.serve.max_replicas} replica(s) of "
                           f"{cfg.serve.model}, tp={cfg.serve.engine.tensor_parallel_size}, port {cfg.serve.port}")
        elif stage == "evaluate":
            b = engine_placement(cfg.device, eval_tensor_parallel(cfg))["bundles"]
            p.resources = _sum(b)
            n_models = (1 + len(cfg.domains) + int(cfg.train.mixture_baseline) + len(cfg.merge.names())
                        + int(cfg.eval.include_teacher) + int("distill" in cfg.stages))
            p.notes.append(f"{n_models} models on {cfg.eval.concurrency or 'as many as fit'} warm vLLM "
                           f"engine(s) (tp={eval_tensor_parallel(cfg)}), weights reloaded between models")
        elif stage == "distill":
            from rdistill.config.distill import distill_train_config
            tc, dc = distill_train_config(cfg), cfg.distill
            s = train_scaling(cfg.device, tc)
            p.resources = _sum(engine_placement(cfg.device, eval_tensor_parallel(cfg))["bundles"])
            if cfg.device == "cpu":  # the engine stays up on CPUs; on GPUs it is closed for the update
                for k, v in _sum([s["resources_per_worker"]], s["num_workers"]).items():
                    p.resources[k] = p.resources.get(k, 0) + v
            from rdistill.data.packing import kd_bytes_per_token
            loss = (f"top-{dc.top_k} KL to the teacher, {kd_bytes_per_token(dc.top_k)} bytes per token of rows"
                    if dc.loss == "topk_kl" else "policy gradient of the reverse KL")
            p.notes.append(f"{dc.rounds} round(s): {dc.prompts_per_domain} prompts x {dc.samples_per_prompt} "
                           f"samples per domain on a warm vLLM engine, scored by each domain's teacher, then "
                           f"{tc.num_workers} Ray Train worker(s) ({loss}, lr={tc.lr})")
        elif stage in ("merge", "verify"):
            p.resources = {"CPU": 1}
            p.notes.append("tasks spread over every free CPU")
        else:
            p.resources = {"CPU": 1}
        plans.append(p)
    return plans


def fits(need: dict[str, float], have: dict[str, Any]) -> list[str]:
    """Resources a plan asks for that the cluster does not have (empty when it fits)."""
    return [f"{k}: needs {v:g}, cluster has {float(have.get(k, 0)):g}"
            for k, v in need.items() if v > float(have.get(k, 0))]
