"""An engine that refuses to start is one line naming the setting of its config section."""

from __future__ import annotations

from rdistill.errors import ResourceError
from rdistill.llm.failures import engine_failure


def _died(root_cause: str) -> Exception:
    """What reaches the driver: vLLM's bare 'see root cause above', with the cause in the chain
    (as Ray's error carries the actor's creation error)."""
    e = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    e.__cause__ = RuntimeError(root_cause)
    return e


def test_known_start_up_refusals_name_the_setting():
    cases = [
        ("Worker failed with error 'Available memory on node 0 (6.09/10.34 GiB) on kv cache allocation is less "
         "than requested memory for kv (200.0 GiB). Decrease --kv-cache-memory-bytes'", "teacher.engine",
         ["200 GiB KV cache", "6.09 of 10.34 GiB free", "teacher.engine.cpu_kvcache_gib"]),
        ("Available memory on node 0 (16.9/20.96 GiB) on startup is less than desired CPU memory utilization "
         "(0.92, 19.29 GiB)", "eval.engine", ["19.29 GiB", "eval.engine.cpu_kvcache_gib"]),
        ("ValueError: To serve at least one request with the models's max seq len (4096), (0.1 GiB KV cache) is "
         "needed, which is larger than the available KV cache memory (0.05 GiB)", "serve.engine",
         ["serve.engine.max_model_len", "serve.engine.cpu_kvcache_gib"]),
        ("OSError: /no/model does not appear to have a file named config.json", "teacher.engine", ["model reference"]),
        ("RuntimeError: Failed to infer device type", "eval.engine", ["device=cpu"]),
    ]
    for cause, section, words in cases:
        err = engine_failure(_died(cause), section)
        assert isinstance(err, ResourceError), cause
        assert "\n" not in str(err) and all(w in str(err) for w in words), (str(err), words)


def test_unknown_engine_failure_is_still_one_line_and_other_errors_pass_through():
    err = engine_failure(_died("something new"), "teacher.engine")
    assert isinstance(err, ResourceError) and "teacher.engine" in str(err) and "\n" not in str(err)
    assert engine_failure(ValueError("a bug elsewhere"), "teacher.engine") is None
