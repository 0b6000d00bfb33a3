"""fusion-bench as the oracle of the spectral merges (TSV-M, Iso-C, Iso-CTS), in a side environment.

fusion-bench (PyPI) is not a dependency of rdistill and is never installed into the project's
venv. `side_env()` installs it, pinned with the few packages its import chain needs that the
project's venv lacks, with `pip --no-deps --target` into a cached folder
(~/.cache/rdistill/oracles/, about 15 s the first time, then reused); a subprocess of the
project's own interpreter with that folder first on PYTHONPATH then imports fusion-bench over
the project's torch, transformers and hydra (no second torch to install). `run_oracle(jobs)`
runs this file as that subprocess: for each job it loads the base and the models' safetensors,
builds modules with those exact tensor names, runs fusion-bench's algorithm class (its `run`, the
code path its own CLI takes) on a BaseModelPool of them, and writes the merged state dict. Iso-C
and Iso-CTS with per-model weights (fusion-bench has none) call the merge function that class
calls on the weighted task vectors. Everything runs on the CPU, one torch thread (like a merge
task on 2 cores, so LAPACK reduces in the same order: the top-k selections amplify rounding).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

# fusion-bench and what importing fusion_bench.method.{task_singular_vector,isotropic_merging}
# needs beyond the project's venv (measured: torchvision, datasets' extras, tensorboard are not).
PINS = ["fusion-bench==0.2.33", "bidict==0.24.1", "lightning==2.6.6", "lightning-utilities==0.15.3",
        "torchmetrics==1.9.0"]


def side_env() -> Path:
    """The cached folder holding fusion-bench and its missing imports (installed once)."""
    root = Path(os.environ.get("RDISTILL_ORACLE_CACHE", Path.home() / ".cache" / "rdistill" / "oracles"))
    key = hashlib.sha256(json.dumps([PINS, sys.version_info[:2]]).encode()).hexdigest()[:12]
    target = root / f"fusion-bench-{key}"
    if (target / ".ready").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # concurrent test processes: one installs
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".ready").exists():
            return target
        tmp = root / f".tmp-{os.getpid()}"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--no-deps", "--no-compile", "--target", str(tmp), *PINS],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"installing the fusion-bench oracle failed: {r.stderr[-2000:]}"
        (tmp / ".ready").write_text(" ".join(PINS))
        os.replace(tmp, target)
    return target


def run_oracle(jobs: list[dict], timeout: int = 600) -> None:
    """Run fusion-bench on each job {method, base, models, weights, lambda, rank_fraction?,
    common_space_fraction?, out} (paths of safetensors files) in one subprocess."""
    env = {**os.environ, "PYTHONPATH": str(side_env()), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, __file__, json.dumps(jobs)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"fusion-bench oracle failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"


# ---------------------------------------------------------------- the side environment's half

def _module(sd):
    """An nn.Module whose state dict is `sd`, names unchanged (submodules along the dots)."""
    from torch import nn
    root = nn.Module()
    for name, value in sd.items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


def _merge(job: dict) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from fusion_bench.modelpool import BaseModelPool
    base = load_file(job["base"])
    models = [load_file(p) for p in job["models"]]
    weights = job.get("weights") or [1.0] * len(models)
    lam = job.get("lambda", 1.0)
    method = job["method"]
    if method == "tsv_m":
        from fusion_bench.method.task_singular_vector import TaskSingularVectorMerging
        assert job.get("rank_fraction", 0) == 0, "fusion-bench's TSV-M keeps 1/T of the rank, nothing else"
        # its alpha: a list scales each task vector before the SVDs, a number the merged one
        assert all(w == 1 for w in weights) or lam == 1, "fusion-bench takes either per-model alphas or one"
        algo = TaskSingularVectorMerging(alpha=list(weights) if any(w != 1 for w in weights) else float(lam))
    elif any(w != 1 for w in weights):
        # Iso has no per-model weights in fusion-bench: its merge function (what the class's run
        # calls) on the scaled task vectors, then the class's base + scaling_factor * merged
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
        from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub
        tvs = [state_dict_mul(state_dict_sub(m, base), w) for m, w in zip(models, weights)]
        merged = iso_c(tvs, accelerator="cpu") if method == "iso_c" else \
            iso_cts(tvs, common_space_fraction=job.get("common_space_fraction", 0.8), accelerator="cpu")
        out = state_dict_add(base, state_dict_mul(merged, lam))
        save_file({k: v.contiguous() for k, v in out.items()}, job["out"])
        return
    else:
        from fusion_bench.method.isotropic_merging import ISO_C_Merge, ISO_CTS_Merge
        algo = ISO_C_Merge(scaling_factor=lam) if method == "iso_c" else \
            ISO_CTS_Merge(scaling_factor=lam, common_space_fraction=job.get("common_space_fraction", 0.8))
    pool = BaseModelPool({"_pretrained_": _module(base), **{f"m{i}": _module(m) for i, m in enumerate(models)}})
    with torch.no_grad():
        merged = algo.run(pool)
    save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, job["out"])


if __name__ == "__main__":
    import contextlib
    import io

    import torch
    torch.set_num_threads(1)  # like a merge task on 2 cores: LAPACK's SVD then reduces in the same order
    for j in json.loads(sys.argv[1]):
        with contextlib.redirect_stdout(io.StringIO()):  # fusion-bench prints a line per tensor
            _merge(j)
    print("done")
