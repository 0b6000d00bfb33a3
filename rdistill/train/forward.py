"""The training forward pass on packed rows: per-token loss with no attention across samples.

No attention_mask and no cache: transformers then derives the sample boundaries from the
position-id resets (see rdistill.data.packing), so packed samples never see each other: a
block-diagonal causal mask for sdpa/eager, and for flash-attention-2 the varlen kernel with
cu_seqlens built from the resets (transformers' `_is_packed_sequence` path, which needs batch
size 1: `PackedRows.batch(..., flat=True)` lays a micro-batch out as one row for it).
"""

from __future__ import annotations

from rdistill.data.sft import IGNORE


def _inputs(model, batch: dict) -> dict:
    dev = next(model.parameters()).device
    return {"input_ids": batch["input_ids"].to(dev), "position_ids": batch["position_ids"].to(dev),
            "use_cache": False}


def token_losses(model, batch: dict, chunk_tokens: int = 0, temperature: float = 1.0):
    """(B, T) cross-entropy of each target token (0 where the target is IGNORE), of the logits
    divided by `temperature`.

    chunk_tokens > 0: through `ChunkedLinearCE` (never the whole [tokens, vocab] logits);
    0: the full logits in fp32 (the reference the chunked loss is tested against)."""
    import torch.nn.functional as F
    if chunk_tokens > 0:
        from rdistill.train.chunked_loss import head_as_loss
        with head_as_loss(model, batch["targets"], chunk_tokens, temperature=temperature):
            return model(**_inputs(model, batch)).logits[..., 0]
    out = model(**_inputs(model, batch))
    tgt = batch["targets"].to(out.logits.device)
    return F.cross_entropy(out.logits.float().transpose(1, 2) / temperature, tgt, ignore_index=IGNORE,
                           reduction="none")


def policy_gradient_sum(model, batch: dict, chunk_tokens: int, temperature: float = 1.0):
    """Importance-weighted policy-gradient loss of the batch's target tokens, summed (a 0-d
    tensor with grad): -sum_t A_t * pi(y_t) / pi_old(y_t), with A_t = batch["advantages"] and
    log pi_old = batch["old_logprobs"] (the frozen snapshot that sampled the tokens). Its
    gradient is -sum_t A_t * ratio_t * grad log pi(y_t), the on-policy distillation update when
    A_t is the teacher's minus the student's logprob; an A of 0 gives a gradient of exactly 0.
    Through the chunked loss (token_losses), never the whole logits; Liger's kernel returns only
    a sum, so it is not used here."""
    import torch
    ce = token_losses(model, batch, chunk_tokens, temperature)
    dev = ce.device
    mask = batch["targets"].to(dev) != IGNORE
    old = batch["old_logprobs"].to(dev)
    ratio = torch.exp(torch.where(mask, -ce - old, torch.zeros_like(ce)))
    return -(batch["advantages"].to(dev) * ratio * mask).sum()


def loss_sum(model, batch: dict, chunk_tokens: int, kernel: str = "chunked"):
    """Summed loss of the batch's target tokens (a 0-d tensor with grad): Liger's fused kernel
    (kernel='liger', GPUs), the chunked loss, or with chunk_tokens=0 the full logits."""
    if chunk_tokens > 0 and kernel == "liger":
        from rdistill.train.chunked_loss import head_as_loss
        with head_as_loss(model, batch["targets"], chunk_tokens, kernel):
            return model(**_inputs(model, batch)).logits.sum()
    return token_losses(model, batch, chunk_tokens).sum()
