"""Cross-entropy over a large vocabulary without the full [tokens, vocab] logits.

`ChunkedLinearCE` computes, for hidden states h (N, H) and the LM-head weight W (V, H), the
per-token loss logsumexp(h W^T) - (h W^T)[target] a chunk of tokens at a time: forward keeps
only each token's logsumexp, backward recomputes each chunk's logits and turns them into
grad_h and grad_W (accumulated in W's dtype, as Liger does). Peak memory is one chunk's fp32
logits (chunk x V x 4 bytes) instead of N x V x (2 + 4 + 4) for bf16 logits, their fp32 copy and
its gradient. Measured on an H200 (benchmarks/bench_gpu.py), forward + backward at Qwen2.5-32B's
head (hidden 5120, vocabulary 152,064) over 16k tokens, bf16, the weight's gradient included:
6.2 GiB at 4096-token chunks, 2.8 GiB at 1024, 27.8 GiB with full logits; the same loss, 1.4x
the time.

It runs *inside the LM-head module* (`head_as_loss` swaps the head's forward for the duration of
one model call): DeepSpeed ZeRO-3 then gathers the partitioned weight for it in forward and again
before its backward, as for any Linear, and the loss flows through the engine's output, where
DeepSpeed hangs its backward prologue. On GPUs Liger's fused linear cross-entropy (Triton) takes
the same slot when installed (`pip install rdistill[liger]`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rdistill.data.sft import IGNORE


class ChunkedLinearCE(torch.autograd.Function):
    """Per-token cross-entropy of (h @ W.T) against targets; every target must be a real token
    (callers select the non-IGNORE positions first, so prompts and padding cost nothing)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = h.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            logits = (h[s:s + chunk] @ w.t()).float()  # the same bf16 matmul, then fp32, as the full path
            picked = logits.gather(1, targets[s:s + chunk, None])[:, 0]
            top = logits.amax(dim=-1)
            # logsumexp in place (torch.logsumexp would hold a second chunk-sized buffer)
            lse[s:s + chunk] = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
            loss[s:s + chunk] = lse[s:s + chunk] - picked
            del logits
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(w) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk]
            p = (hc @ w.t()).float()
            p.sub_(lse[s:s + ctx.chunk, None]).exp_()  # softmax, in place: one fp32 chunk alive
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, targets[s:s + ctx.chunk]] -= 1.0
            p.mul_(grad[s:s + ctx.chunk, None].float())
            g = p.to(h.dtype)
            del p
            if need_h:
                gh[s:s + ctx.chunk] = g @ w
            if need_w:
                gw.addmm_(g.t(), hc)
        return gh, gw, None, None


def _liger():
    """Liger's fused linear cross-entropy module class, or None where it is not installed (the
    module's call, (weight, input, target), is the same across Liger versions; its functional
    form is not)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None


def liger_available() -> bool:
    return _liger() is not None and torch.cuda.is_available()


def head_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
                kernel: str = "chunked", temperature: float = 1.0, kd: dict | None = None) -> torch.Tensor:
    """Per-token losses (B, T) of `head` over hidden (B, T, H), 0 at IGNORE targets; kernel
    'liger' returns their sum only (a 0-d tensor: Liger's gradient assumes a scalar loss).
    temperature t: the losses of logits / t (the head is linear without bias, so h / t).
    kd {ids, logprobs (B, T, k), weight, temperature, ce_weight}: adds weight * T^2 * the top-k
    KL (rdistill.train.kd_loss) to each loss token's cross-entropy (times ce_weight, default 1)."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("the chunked loss supports LM heads without bias (set train.loss_chunk_tokens=0)")
    if temperature != 1.0:
        hidden = hidden / temperature
    B, T, H = hidden.shape
    h, t = hidden.reshape(B * T, H), targets.reshape(B * T).to(hidden.device)
    if kernel == "liger":
        out = _liger()(ignore_index=IGNORE, reduction="sum")(head.weight, h, t)
        return out[0] if isinstance(out, tuple) else out  # some versions also return a z-loss
    idx = (t != IGNORE).nonzero()[:, 0]  # loss positions only: prompts and padding cost nothing
    per = ChunkedLinearCE.apply(h.index_select(0, idx), head.weight, t.index_select(0, idx), max(1, chunk))
    if kd is not None:
        from rdistill.train.kd_loss import topk_kl
        k = kd["ids"].shape[-1]
        sel = lambda x: x.reshape(B * T, k).to(h.device).index_select(0, idx)  # noqa: E731
        kl = topk_kl(hidden.reshape(B * T, H).index_select(0, idx), head.weight, sel(kd["ids"]),
                     sel(kd["logprobs"]), kd["temperature"], max(1, chunk))
        per = kd.get("ce_weight", 1.0) * per + kd["weight"] * kd["temperature"] ** 2 * kl
    return torch.zeros(B * T, dtype=per.dtype, device=per.device).index_copy(0, idx, per).view(B, T)


def _unsupported(config) -> str | None:
    """Why the model's own forward does something to the logits the swap would skip."""
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"{type(config).__name__}.{key}={getattr(config, key)} rescales the logits"
    return None


@contextmanager
def head_as_loss(model, targets: torch.Tensor, chunk: int, kernel: str = "chunked", temperature: float = 1.0,
                 kd: dict | None = None):
    """For one call of `model` (an HF causal LM or a DeepSpeed engine around one), its LM head
    returns the loss instead of logits: `out.logits` is then (B, T, 1) per-token losses, or the
    (1, 1, 1) summed loss for Liger."""
    hf = getattr(model, "module", model)
    why = _unsupported(hf.config)
    if why:
        raise ValueError(f"the chunked loss cannot run on this model ({why}): set train.loss_chunk_tokens=0")
    head = hf.get_output_embeddings()

    def forward(hidden):
        out = head_losses(head, hidden, targets, chunk, kernel, temperature, kd)
        return out.view(1, 1, 1) if out.dim() == 0 else out[..., None]

    head.forward = forward  # an instance attribute: ZeRO-3's module hooks still fire around it
    try:
        yield
    finally:
        del head.forward
