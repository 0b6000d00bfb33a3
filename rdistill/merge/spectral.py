"""Data-free spectral merges: TSV-M (task singular vectors) and Iso-C / Iso-CTS (isotropic merging).

Each works on the task vectors tau_i = w_i (X_i - B) of one tensor, all at once (an SVD needs the
whole matrix, so these methods are never cut into blocks of rows), and returns
B + lambda * merged. The arithmetic follows fusion-bench 0.2.33 (the oracle in the tests):

- TSV-M (Gargiulo et al., CVPR 2025; fusion-bench `TSVM_utils.compute_and_sum_svd_mem_reduction`):
  per 2-D tensor, each task keeps its top k = int(rank * rank_fraction) singular triplets
  (rank_fraction 1/T by default), placed side by side; the concatenated U's and V's are
  orthogonalised (the polar factor, from an SVD) and recombined with the kept singular values.
- Iso-C (Marczak et al., ICML 2025; fusion-bench `iso_utils.iso_c`): per 2-D tensor, the SVD of
  the summed task vectors with every singular value replaced by their mean (a flat spectrum).
- Iso-CTS (`iso_utils.iso_cts`): the top `common_space_fraction` of the summed task vectors'
  singular directions, plus each task's top directions outside that common space (as many per
  task as the rest of the rank divided by T), orthogonalised, with a flat spectrum.

Every other tensor (1-D norms and biases, anything not 2-D) gets the mean of the task vectors,
as fusion-bench does; 2-D embeddings and LM heads are matrices like any other and are merged
spectrally, as fusion-bench does for every 2-D parameter it is not told to exclude (its
`exclude_keys`; here a tensor is excluded by giving it another method's step). Per-model
`weight` scales each task vector first (fusion-bench's TSV `alpha` list; for Iso an extension,
tested against fusion-bench given the scaled models), `lambda` the merged one (TSV's `alpha`,
Iso's `scaling_factor`). The task vectors and the SVDs are in float32 (float64 inputs stay in
float64) whatever the step's dtype (torch has no 16-bit SVD), rounded once at the end.
"""

from __future__ import annotations

from typing import Optional

import torch


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class TaskVectors:
    """The weighted task vectors w_i (X_i - B) of one tensor in the working dtype, each made when
    asked for and dropped after use: a merge holds a few float32 copies of the matrix, not T + 1
    (Iso-CTS asks for each twice; a subtraction is cheap next to an SVD)."""

    def __init__(self, xs: list[torch.Tensor], per: list[dict]):
        self.xs, self.per, self.dtype = xs, per, _work_dtype(xs[0])
        self.shape = tuple(xs[0].shape)

    def __len__(self) -> int:
        return len(self.per)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self.per):
            raise IndexError(i)
        tau = self.xs[i + 1].to(self.dtype) - self.xs[0].to(self.dtype)
        w = self.per[i]["weight"]
        return tau.mul_(w) if w != 1 else tau

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.xs[0].device)

    def total(self) -> torch.Tensor:
        """sum_i tau_i, in order (fusion-bench's Python sum)."""
        out = self[0]
        for i in range(1, len(self)):
            out += self[i]
        return out

    def mean(self) -> torch.Tensor:
        """fusion-bench's running mean (its order of operations), for the non-matrix tensors."""
        out = self[0]
        for i in range(1, len(self)):
            out += (self[i] - out) / (i + 1)
        return out

    def finish(self, merged: torch.Tensor, lam: float) -> torch.Tensor:
        """B + lambda * merged, in the inputs' dtype."""
        if lam != 1:
            merged = merged * lam
        return (self.xs[0].to(self.dtype) + merged).to(self.xs[0].dtype)


def _orthogonal(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal (polar) factor of `a`: U V^T of its SVD, the nearest matrix with
    orthonormal columns (or rows, when `a` is wide)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def tsv_rank(shape: tuple, n_models: int, fraction: float) -> int:
    """Singular directions TSV-M keeps per task: int(rank * fraction), fraction 0 meaning 1/T
    (fusion-bench computes int(rank * (1 / T)))."""
    return int(min(shape) * (fraction if fraction else 1 / n_models))


def iso_cts_sizes(shape: tuple, n_models: int, fraction: float) -> tuple[int, int]:
    """(common-space size, directions per task) of Iso-CTS, fusion-bench's rounding: the
    task-specific part is a multiple of T, so the common size may move off rank * fraction (and
    below 0 for a small layer and a small fraction: the check refuses that)."""
    rank = min(shape)
    common = int(rank * fraction)
    common = rank - round((rank - common) / n_models) * n_models
    return common, int((rank - common) / n_models)


def _tsv_matrix(taus: TaskVectors, fraction: float) -> torch.Tensor:
    k = tsv_rank(taus.shape, len(taus), fraction)
    m, n = taus.shape
    r = min(m, n)
    sum_u, sum_s, sum_vh = taus.zeros(m, r), taus.zeros(r), taus.zeros(r, n)
    for i in range(len(taus)):
        u, s, vh = torch.linalg.svd(taus[i], full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_vh[i * k:(i + 1) * k, :] = vh[:k, :]
        del u, s, vh
    # fusion-bench: multi_dot(u_u, vh_u, diag(sum_s), u_vh, vh_vh); scaling the columns is the
    # same product without an r x r diagonal matrix
    return (_orthogonal(sum_u) * sum_s) @ _orthogonal(sum_vh)


def _iso_c_matrix(taus: TaskVectors) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(taus.total(), full_matrices=False)
    return (u * s.mean()) @ vh


EXACT_PROJECTION_RATIO = 4
"""Iso-CTS projects the common space out in fusion-bench's order, (cu cu^T) tau, on matrices up to
this many times taller than wide; a taller one (an embedding: 152k x 1024) as cu (cu^T tau),
m/n times cheaper. The order matters to the last bits only, but the top-k selection that
follows amplifies them: on random task vectors the cheap order lands up to 2e-5 from
fusion-bench, about what fusion-bench itself moves between 1 and 2 BLAS threads."""


def _project_out(cu: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """tau - (cu cu^T) tau: the task's update with the common space projected out. fusion-bench's
    order (the m x m projector first) up to EXACT_PROJECTION_RATIO, by blocks of n rows of the
    projector when m > n (never more memory than tau; each element is the same dot product)."""
    m, n = tau.shape
    if m <= n:
        return tau - cu @ cu.T @ tau
    if m > EXACT_PROJECTION_RATIO * n:
        return tau - cu @ (cu.T @ tau)
    out = torch.empty_like(tau)
    for r in range(0, m, n):
        out[r:r + n] = tau[r:r + n] - (cu[r:r + n] @ cu.T) @ tau
    return out


def _iso_cts_matrix(taus: TaskVectors, fraction: float) -> torch.Tensor:
    m, n = taus.shape
    r = min(m, n)
    common, k = iso_cts_sizes((m, n), len(taus), fraction)
    u, s, vh = torch.linalg.svd(taus.total(), full_matrices=False)
    cu, cs, cvh = u[:, :common], s[:common], vh[:common, :]
    del u, s, vh
    all_u, all_s, all_vh = taus.zeros(m, r), taus.zeros(r), taus.zeros(r, n)
    for i in range(len(taus)):
        outside = _project_out(cu, taus[i])
        u, s, vh = torch.linalg.svd(outside, full_matrices=False)
        all_u[:, i * k:(i + 1) * k] = u[:, :k]
        all_s[i * k:(i + 1) * k] = s[:k]
        all_vh[i * k:(i + 1) * k, :] = vh[:k, :]
        del outside, u, s, vh
    t = len(taus) * k
    all_u[:, t:t + common] = cu
    all_s[t:t + common] = cs
    all_vh[t:t + common, :] = cvh
    return (_orthogonal(all_u) * all_s.mean()) @ _orthogonal(all_vh)


def tsv_m(xs, shared, per, gens, name):
    taus = TaskVectors(xs, per)
    merged = _tsv_matrix(taus, shared["rank_fraction"]) if len(taus.shape) == 2 else taus.mean()
    return taus.finish(merged, shared["lambda"])


def iso_c(xs, shared, per, gens, name):
    taus = TaskVectors(xs, per)
    # not a matrix: fusion-bench's sum(tvs) / T
    merged = _iso_c_matrix(taus) if len(taus.shape) == 2 else taus.total() / len(taus)
    return taus.finish(merged, shared["lambda"])


def iso_cts(xs, shared, per, gens, name):
    taus = TaskVectors(xs, per)
    merged = _iso_cts_matrix(taus, shared["common_space_fraction"]) if len(taus.shape) == 2 else taus.mean()
    return taus.finish(merged, shared["lambda"])


# ---------------------------------------------------------------- checks before any work

def check(method: str, name: str, shape: Optional[tuple], shared: dict, per: list[dict]) -> Optional[str]:
    """Why the parameters cannot merge the tensor `name` of `shape` (one line naming the tensor
    and the fix), else None. The driver asks for every tensor's header before any task starts."""
    n = len(per)
    if method == "tsv_m":
        f = shared["rank_fraction"]
        if not 0 <= f <= 1:
            return (f"tsv_m: rank_fraction={f:g} is invalid: use a share of each layer's rank "
                              f"in (0, 1/{n}] for {n} models (0: 1/{n}, the default)")
        if shape is not None and len(shape) == 2:
            k = tsv_rank(shape, n, f)
            if n * k > min(shape):
                return (
                    f"tsv_m: rank_fraction={f:g} keeps rank {k} per model of {name} "
                    f"({shape[0]}x{shape[1]}, rank {min(shape)}), {n * k} for {n} models, more than the layer "
                    f"has: use rank_fraction <= 1/{n} (0: 1/{n})")
    elif method == "iso_cts":
        f = shared["common_space_fraction"]
        if not 0 <= f <= 1:
            return (f"iso_cts: common_space_fraction={f:g} is invalid: use a share of each "
                              "layer's rank in [0, 1] (default 0.8)")
        if shape is not None and len(shape) == 2:
            common, k = iso_cts_sizes(shape, n, f)
            if common < 0:
                return (
                    f"iso_cts: common_space_fraction={f:g} leaves {n * k} task-specific directions "
                    f"({k} per model) of {name} ({shape[0]}x{shape[1]}), more than its rank {min(shape)}: "
                    "raise common_space_fraction")
    return None
