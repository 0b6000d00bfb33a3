"""Per-tensor merge math: Arcee Fusion and the standard methods, with mergekit's names and defaults.

Each method takes the input tensors already cast to the step's compute dtype (base first when the
method has one), the step's shared parameters and one parameter dict per non-base model (per
model for `linear`), and returns the merged tensor. The arithmetic follows mergekit 0.1.5 op for
op (same dtypes, same order), so results agree bit for bit or within one rounding of the compute
dtype; the exceptions are faster but equivalent selections (a k-th value threshold instead of a
full sort for TIES) and randomness drawn from a generator seeded per tensor and model, so a
merge is reproducible whatever the order in which tasks run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from rdistill.config.fields import MERGE_METHODS
from rdistill.merge import spectral
from rdistill.merge.regmean import regmean_tensor

QUANTILE_SAMPLE = 1_000_000  # arcee_fusion: quantiles from a 1e6-element sample, as mergekit does


@dataclass(frozen=True)
class MethodSpec:
    fn: Callable[..., torch.Tensor]
    base: str
    """required | ignored."""
    min_models: int = 1
    """Fewest non-base models."""
    max_models: Optional[int] = None
    shared: dict = field(default_factory=dict)
    """Shared parameters and defaults (None: required)."""
    per_model: dict = field(default_factory=dict)
    """Per-model parameters and defaults (None: required)."""
    check: Optional[Callable[..., Optional[str]]] = None
    """(tensor name, shape, shared, per) -> why these parameters cannot merge that tensor, else
    None: the driver asks for every tensor before any work (a rank larger than the layer)."""
    stats: Optional[str] = None
    """regmean | regmean_plusplus: the method reads input statistics collected before the merge
    (rdistill.merge.stats), each model on its domain's data."""


# ---------------------------------------------------------------- sparsification (TIES, DARE)

def _rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()  # l1, mergekit's RescaleNorm.l1
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def top_k_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a flat non-negative float tensor.

    A k-th value threshold (O(n)) instead of mergekit's full argsort (most of TIES's time).
    Ties at the threshold keep the lowest indices, so exactly k entries are kept, like argsort's
    top k; which of several equal magnitudes is kept may differ from mergekit's unstable sort."""
    n = w.numel()
    thr = torch.kthvalue(w, n - k + 1).values
    mask = w > thr
    need = k - int(mask.sum())
    if need > 0:
        eq = w == thr
        mask |= eq & (torch.cumsum(eq, 0) <= need)
    return mask


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the `density` share of largest-magnitude entries (TIES)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = top_k_mask(tensor.abs().reshape(-1).float(), k).to(tensor.dtype)
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def bernoulli(tensor: torch.Tensor, density: float, rescale: bool, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density`, rescaling by the l1 norm (DARE)."""
    if density >= 1:
        return tensor
    work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32  # CPU bernoulli: no fp16
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work), generator=gen)
    return _rescaled(tensor.to(work), mask, rescale).to(tensor.dtype)


def _sign_mask(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """TIES sign election ('sum'): keep entries whose sign agrees with the weighted sum's."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def combine(base: torch.Tensor, deltas: torch.Tensor, shared: dict, per: list[dict], consensus: bool) -> torch.Tensor:
    """Weighted (and for TIES sign-elected) sum of sparsified task vectors, added to the base."""
    weights = torch.tensor([p["weight"] for p in per], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if consensus:
        mask = _sign_mask(deltas, torch.int8 if shared["int8_mask"] else base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


def _task_arithmetic_family(sparsify: Optional[str], consensus: bool):
    def fn(xs, shared, per, gens, name):
        base, others = xs[0], xs[1:]
        deltas = base.new_empty((len(others), *base.shape))
        for i, (x, p) in enumerate(zip(others, per)):
            delta = x - base
            if sparsify == "magnitude":
                delta = magnitude(delta, p["density"], shared["rescale"])
            elif sparsify == "random":
                delta = bernoulli(delta, p["density"], shared["rescale"], gens[i])
            deltas[i] = delta
            del delta
        return combine(base, deltas, shared, per, consensus)
    return fn


def _gta_spec(sparsify, consensus, normalize, rescale) -> MethodSpec:
    return MethodSpec(_task_arithmetic_family(sparsify, consensus), base="required",
                      shared={"lambda": 1.0, "normalize": normalize, "rescale": rescale, "int8_mask": False},
                      per_model={"weight": None, "density": 1.0})


# ---------------------------------------------------------------- linear, slerp, model_stock

def linear(xs, shared, per, gens, name):
    first = xs[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in per], dtype=dtype, device=first.device)
    out = torch.zeros_like(first, dtype=dtype)
    for x, w in zip(xs, weights.unbind(0)):
        out.addcmul_(x, w.reshape((1,) * max(x.ndim, 1)) if x.ndim else w)
    if shared["normalize"]:
        out.div_(weights.sum())
    return out.to(first.dtype)


def slerp(xs, shared, per, gens, name, dot_threshold: float = 0.9995, eps: float = 1e-8, chunk: int = 1 << 20):
    """Spherical interpolation of the flattened tensors (t=0: base), in float32 chunks."""
    v0, v1 = xs
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([[float(shared["t"])]], dtype=dtype, device=v0.device)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    na = [torch.linalg.vector_norm(a[:, s:s + chunk].to(dtype), dim=1, keepdim=True) for s in range(0, a.shape[1], chunk)]
    nb = [torch.linalg.vector_norm(b[:, s:s + chunk].to(dtype), dim=1, keepdim=True) for s in range(0, a.shape[1], chunk)]
    norm_a, norm_b = (torch.linalg.vector_norm(torch.stack(p), dim=0) for p in (na, nb))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, s:s + chunk].to(dtype) / norm_a) * (b[:, s:s + chunk].to(dtype) / norm_b))
                       .sum(dim=1, keepdim=True) for s in range(0, a.shape[1], chunk)]).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(lin, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(lin, t, torch.sin(t * theta) / sin_theta)
    out = torch.empty_like(a)
    for s in range(0, a.shape[1], chunk):
        out[:, s:s + chunk] = ca * a[:, s:s + chunk].to(dtype) + cb * b[:, s:s + chunk].to(dtype)
    return out.reshape(v0.shape)


def model_stock(xs, shared, per, gens, name):
    """t = N c / (1 + (N-1) c), c the mean pairwise cosine of the task vectors; t * mean + (1-t) base."""
    w0, ws = xs[0], xs[1:]
    shape = w0.shape
    if shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norms = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cos.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6  # opposing updates: keep the base rather than amplify them
    t = torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


# ---------------------------------------------------------------- Arcee Fusion

def sample_indices(numel: int, seed: int) -> Optional[torch.Tensor]:
    """Where the importance quantiles are read: every entry of a small tensor (None), else 1e6
    positions drawn with replacement as mergekit does, but from a generator seeded per tensor."""
    if numel <= QUANTILE_SAMPLE:
        return None
    return torch.randint(numel, (QUANTILE_SAMPLE,), generator=torch.Generator().manual_seed(seed))


def fusion_kl(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """KL(softmax X || softmax B) per row (keepdim): row-local, so a block of rows gets the same
    values as the whole tensor."""
    eps = 1e-8
    p = F.softmax(x, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_importance(base: torch.Tensor, x: torch.Tensor, kl: Optional[torch.Tensor] = None) -> torch.Tensor:
    """|X - B| * KL per row (`kl`: already computed)."""
    return (x - base).abs() * (fusion_kl(base, x) if kl is None else kl)


def kth_values(x: torch.Tensor, ks: list[int]) -> list[torch.Tensor]:
    """The k-th smallest values (1-based) of a flat tensor, as torch.kthvalue gives them. 16-bit
    floats: from a histogram of their bit patterns made order-preserving (O(n), no selection)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return [torch.kthvalue(x, k).values for k in ks]
    v = x.view(torch.int16).to(torch.int32)
    key = torch.where(v < 0, -(v & 0x7FFF) - 1, v) + 32768  # negatives: bigger magnitude first
    cum = torch.cumsum(torch.bincount(key.cpu(), minlength=65536), 0)
    out = []
    for k in ks:
        b = int(torch.searchsorted(cum, k)) - 32768  # the first key with at least k values up to it
        bits = b if b >= 0 else (-(b + 1)) - 32768
        out.append(torch.tensor(bits, dtype=torch.int16).view(x.dtype).to(x.device))
    return out


def fusion_threshold(sample: torch.Tensor) -> torch.Tensor:
    """median + 1.5 IQR of the sampled importances (k-th values: the elements a sort would give)."""
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (sample.numel() - 1)).long()
    q1, med, q3 = kth_values(sample, [int(i) + 1 for i in idx])
    return med + 1.5 * (q3 - q1)


def fusion_keep(base: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Where Arcee Fusion keeps x's change: importance >= median + 1.5 IQR of the importances."""
    importance = fusion_importance(base, x)
    flat = importance.reshape(-1)
    idx = sample_indices(flat.numel(), seed)
    return importance >= fusion_threshold(flat if idx is None else flat[idx.to(flat.device)])


def fusion_merge(base: torch.Tensor, x: torch.Tensor, keep: torch.Tensor,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x's change where `keep`, else the base. In float32 like mergekit's (its mask is float),
    unless the result is written in the compute dtype: then a select, the same bits, 10x faster."""
    if out_dtype == base.dtype:
        return torch.where(keep, base + (x - base), base)
    return base + (x - base) * keep.float()


def arcee_fusion(xs, shared, per, gens, name):
    """Keep the other model's change where its importance reaches median + 1.5 IQR of all
    importances; elsewhere keep the base."""
    base, x = xs
    return fusion_merge(base, x, fusion_keep(base, x, gens[0].initial_seed()))


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(linear, base="ignored", shared={"normalize": True}, per_model={"weight": None}),
    "task_arithmetic": _gta_spec(None, False, normalize=False, rescale=False),
    "ties": _gta_spec("magnitude", True, normalize=True, rescale=False),
    "dare_ties": _gta_spec("random", True, normalize=False, rescale=True),
    "dare_linear": _gta_spec("random", False, normalize=False, rescale=True),
    "slerp": MethodSpec(slerp, base="required", min_models=1, max_models=1, shared={"t": None}),
    "model_stock": MethodSpec(model_stock, base="required", min_models=2, shared={"filter_wise": False}),
    "arcee_fusion": MethodSpec(arcee_fusion, base="required", min_models=1, max_models=1),
    **{m: MethodSpec(getattr(spectral, m), base="required", shared={"lambda": 1.0, **extra}, per_model={"weight": 1.0},
                     check=partial(spectral.check, m))  # spectral.py: TSV-M, Iso-C, Iso-CTS
       for m, extra in [("tsv_m", {"rank_fraction": 0.0}), ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.8})]},
    # fusion-bench's RegMean and RegMean++ (alpha 0.95, its default), a coefficient per model
    "regmean": MethodSpec(regmean_tensor, base="ignored", shared={"reduce_non_diagonal_ratio": 0.95},
                          per_model={"weight": 1.0}, stats="regmean"),
    "regmean_plusplus": MethodSpec(regmean_tensor, base="ignored", shared={"reduce_non_diagonal_ratio": 0.95},
                                   per_model={"weight": 1.0}, stats="regmean_plusplus"),
}
# The registry implements exactly the methods the configs allow (one list: config.fields).
assert sorted(METHODS) == sorted(MERGE_METHODS), "merge methods: registry and config disagree"


def merge_tensor(method: str, xs: list[torch.Tensor], shared: dict[str, Any], per: list[dict],
                 gens: list[torch.Generator], name: str = "") -> torch.Tensor:
    """Merge one tensor. Non-float tensors (buffers) must agree across inputs and are copied."""
    if not all(x.is_floating_point() for x in xs):
        if any(x.dtype != xs[0].dtype or not torch.equal(x, xs[0]) for x in xs[1:]):
            raise ValueError(f"non-float tensor {name} differs between inputs; it cannot be merged")
        return xs[0].clone()
    return METHODS[method].fn(xs, shared, per, gens, name)
