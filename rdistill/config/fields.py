"""Declarative field constraints for the typed configs, and the walker that checks them.

Each dataclass field may carry `metadata={"choices": [...], "ge": x, "gt": x, "le": x}`.
`check(obj)` walks a config tree and raises `ConfigError` naming the full key, the bad
value and what is allowed, so a bad override fails in one line before any work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rdistill.errors import ConfigError  # noqa: F401  (re-exported: its home is rdistill.errors)

# Allowed values used by several configs (and by the merge plans): defined once here.
DTYPES = ["bfloat16", "float16", "float32"]
"""Dtypes a merge computes in and writes."""
ENGINE_DTYPES = DTYPES + ["auto"]
"""Dtypes an inference engine loads weights in (auto: the checkpoint's)."""
MERGE_METHODS = ["arcee_fusion", "ties", "dare_ties", "dare_linear", "task_arithmetic", "linear", "slerp",
                 "model_stock"]
"""Merge methods, mergekit's names (rdistill.merge.methods.METHODS implements exactly these)."""
MERGE_METHODS += ["tsv_m", "iso_c", "iso_cts"]  # data-free spectral merges (rdistill/merge/spectral.py)
MERGE_METHODS += ["regmean", "regmean_plusplus"]  # data-based, fusion-bench's (rdistill/merge/regmean.py)


def shared_fields(source: Any, target_cls: type, **given: Any) -> Any:
    """A `target_cls` built from the fields it shares (by name) with the config `source`, then
    `given`: a runtime object takes a config's settings without copying them one by one, and a
    setting added to both is passed on with no code to change."""
    names = {f.name for f in dataclasses.fields(target_cls)} & {f.name for f in dataclasses.fields(source)}
    import copy
    return target_cls(**{n: copy.deepcopy(getattr(source, n)) for n in names if n not in given}, **given)


def spec(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
         choices: list | None = None, ge: float | None = None, gt: float | None = None,
         le: float | None = None) -> Any:
    """A dataclass field with constraints the walker checks."""
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le).items() if v is not None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _check_value(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        fail(key, value, "allowed: " + ", ".join(map(str, meta["choices"])))
    if "ge" in meta and value < meta["ge"]:
        fail(key, value, f"must be >= {meta['ge']}")
    if "gt" in meta and value <= meta["gt"]:
        fail(key, value, f"must be > {meta['gt']}")
    if "le" in meta and value > meta["le"]:
        fail(key, value, f"must be <= {meta['le']}")


def check(obj: Any, prefix: str = "") -> None:
    """Check every constrained field of a dataclass tree, then its own `validate()` hook."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            key = f"{prefix}{f.name}"
            value = getattr(obj, f.name)
            if isinstance(value, list) and f.metadata.get("choices"):
                for v in value:
                    _check_value(key, v, f.metadata)
            else:
                _check_value(key, value, f.metadata)
            check(value, key + ".")
        hook = getattr(obj, "validate", None)
        if callable(hook):
            hook(prefix)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check(v, f"{prefix.rstrip('.')}[{i}].")
