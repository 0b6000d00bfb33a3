"""RegMean's closed form (Jin et al., ICLR 2023), per tensor, as fusion-bench computes it.

For a linear layer y = x W^T (HF keeps W as (out, in)) and models i with Gram matrices
G_i = X_i^T X_i / n_i of the layer's inputs on their own domain's data, the merged weight that
best reproduces every model's outputs on its own inputs is

    W*^T = (sum_i c_i G~_i)^-1 sum_i c_i G~_i W_i^T,

G~ being G with its off-diagonal entries scaled by `reduce_non_diagonal_ratio` (alpha, which
keeps the sum well conditioned) and c_i the model's `weight` (1 for every model is
fusion-bench's RegMean; other values are a per-branch coefficient the search draws). Every
other tensor (embeddings, norms, biases, a linear layer without statistics) is the weighted mean
c-normalised, fusion-bench's averaging. RegMean++ uses the same closed form; only where its
Gram matrices come from differs (rdistill.merge.regmean_pp).

The Grams live on disk (rdistill.merge.grams writes them); the per-tensor function reads the
ones of its layer, so the merge streams tensor by tensor like every other method.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import torch

from rdistill.errors import RdistillError

STATS_KEY = "_stats"
"""Shared parameter the executor sets on a statistics method's tensors: one stats folder per
non-base model, in the method's order."""
INDEX = "grams.json"


class StatsError(RdistillError):
    """Statistics that cannot be used: missing, of the wrong shape, or singular."""


def solve(weights: list[torch.Tensor], grams: Iterable[torch.Tensor], ratio: float,
          coefs: Optional[list[float]] = None, name: str = "") -> torch.Tensor:
    """The merged (out, in) weight, in float64: Cholesky of the summed Grams (symmetric,
    positive definite unless an input feature is never active), LU when that fails. `grams`
    may be a generator: one model's matrix is in memory at a time (a 32B student's down
    projection has 27648 inputs, 3 GB per matrix in float32), so the peak is about 20 in^2
    bytes whatever the number of models."""
    dev = weights[0].device
    coefs = coefs or [1.0] * len(weights)
    n = weights[0].shape[1]
    a = torch.zeros((n, n), dtype=torch.float64, device=dev)
    b = torch.zeros((n, weights[0].shape[0]), dtype=torch.float64, device=dev)
    for w, g, c in zip(weights, grams, coefs):
        gr = g.to(device=dev, dtype=torch.float64)
        del g
        diag = gr.diagonal().clone()
        gr.mul_(ratio * c).diagonal().copy_(diag.mul_(c))  # c (ratio G + (1 - ratio) diag G)
        a += gr
        b.addmm_(gr, w.to(torch.float64).T)
        del gr
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        del a
        return torch.cholesky_solve(b, chol).T
    del chol
    out = torch.linalg.solve_ex(a, b)
    if int(out.info) != 0 or not bool(torch.isfinite(out.result).all()):
        raise StatsError(f"regmean: the summed Gram matrices of {name or 'a layer'} are singular (an input "
                         "feature is never active in the domain data): use more rows (merge.stats.samples) "
                         "or check the data")
    return out.result.T


def weighted_mean(xs: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """sum c_i x_i / sum c_i in float32 (float64 inputs stay float64): fusion-bench's mean when
    every c_i is 1."""
    dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    out = torch.zeros_like(xs[0], dtype=dtype)
    for x, c in zip(xs, coefs):
        out.add_(x.to(dtype), alpha=c)
    return out.div_(sum(coefs))


# ---------------------------------------------------------------- reading the statistics

@lru_cache(maxsize=64)
def _index(folder: str) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise StatsError(f"regmean statistics {folder} are missing ({INDEX}): delete the folder to collect them again")
    return json.loads(path.read_text())


@lru_cache(maxsize=16)
def _open(path: str):
    from safetensors import safe_open
    return safe_open(path, framework="pt")


def gram_entry(folder: str, module: str) -> Optional[tuple[str, str]]:
    """(shard file, tensor name) of the Gram of `module`'s inputs, None when it has none."""
    idx = _index(folder)
    owner = idx["aliases"].get(module, module)
    loc = idx["grams"].get(owner)
    return None if loc is None else (str(Path(folder) / loc), owner)


def read_gram(folder: str, module: str) -> Optional[torch.Tensor]:
    entry = gram_entry(folder, module)
    return None if entry is None else _open(entry[0]).get_tensor(entry[1])


def module_of(tensor: str) -> Optional[str]:
    """The module whose weight a tensor is (`...q_proj.weight` -> `...q_proj`), else None."""
    return tensor[: -len(".weight")] if tensor.endswith(".weight") else None


def regmean_tensor(xs, shared, per, gens, name):
    """One tensor of a RegMean or RegMean++ merge: the closed form where every model has a Gram
    of this layer's inputs, else the weighted mean."""
    coefs = [float(p["weight"]) for p in per]
    module = module_of(name) if xs[0].dim() == 2 else None
    folders = shared.get(STATS_KEY)
    if module and not folders:
        raise StatsError(f"regmean: no input statistics for {name} (the executor collects them: "
                         "rdistill.merge.stats.ensure)")
    if not module or any(gram_entry(f, module) is None for f in folders):
        return weighted_mean(xs, coefs)

    def grams():
        for f in folders:
            g = read_gram(f, module)
            if g.shape != (xs[0].shape[1], xs[0].shape[1]):
                raise StatsError(f"regmean statistics {f}: the Gram of {module} is {tuple(g.shape)}, its weight "
                                 f"{name} has {xs[0].shape[1]} inputs; delete the folder to collect them again")
            yield g
    return solve(xs, grams(), float(shared["reduce_non_diagonal_ratio"]), coefs, name)


def forget_open_files() -> None:
    """Drop cached indexes and handles (statistics rewritten in this process)."""
    _index.cache_clear()
    _open.cache_clear()
