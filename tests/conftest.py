"""Shared fixtures: one local Ray cluster per test session (each start costs seconds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh local Ray cluster with enough logical CPUs for Data checkpointing and Serve."""
    import ray
    from rdistill.config import RayConfig
    from rdistill.topology import init_ray
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(RayConfig(num_cpus=8))
    yield ray
    ray.shutdown()
