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


def token_losses(model, batch: dict, chunk_tokens: int = 0, temperature: float = 1.0, kd: dict | None = None):
    """(B, T) cross-entropy of each target token (0 where the target is IGNORE), of the logits
    divided by `temperature`; kd {weight, temperature, ce_weight}: ce_weight (default 1) times that
    plus weight times the top-k KL term of the batch's
    kd_ids / kd_logprobs (rdistill.train.kd_loss).

    chunk_tokens > 0: through `ChunkedLinearCE` (never the whole [tokens, vocab] logits);
    0: the full logits in fp32 (the reference the chunked loss is tested against)."""
    import torch.nn.functional as F
    kd = dict(kd, ids=batch["kd_ids"], logprobs=batch["kd_logprobs"]) if kd else None
    if chunk_tokens > 0:
        from rdistill.train.chunked_loss import head_as_loss
        with head_as_loss(model, batch["targets"], chunk_tokens, temperature=temperature, kd=kd):
            return model(**_inputs(model, batch)).logits[..., 0]
    out = model(**_inputs(model, batch))
    tgt = batch["targets"].to(out.logits.device)
    ce = F.cross_entropy(out.logits.float().transpose(1, 2) / temperature, tgt, ignore_index=IGNORE,
                         reduction="none")
    if kd:
        from rdistill.train.kd_loss import logits_kl
        dev = out.logits.device
        kl = logits_kl(out.logits, kd["ids"].to(dev).long(), kd["logprobs"].to(dev), kd["temperature"])
        ce = kd.get("ce_weight", 1.0) * ce + kd["weight"] * kd["temperature"] ** 2 * kl * (tgt != IGNORE)
    return ce


def policy_gradient_sum(model, batch: dict, chunk_tokens: int, temperature: float = 1.0, clip: float = 0.0):
    """Importance-weighted policy-gradient loss of the batch's target tokens, summed (a 0-d
    tensor with grad): -sum_t A_t * pi(y_t) / pi_old(y_t), with A_t = batch["advantages"] and
    log pi_old = batch["old_logprobs"] (the frozen snapshot that sampled the tokens). Its
    gradient is -sum_t A_t * ratio_t * grad log pi(y_t), the on-policy distillation update when
    A_t is the teacher's minus the student's logprob; an A of 0 gives a gradient of exactly 0.
    clip > 0: PPO's clipped surrogate, -min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) * A):
    a token whose ratio already moved past the clip in A's direction stops pulling, so the many
    steps of a round cannot drag the policy far from the snapshot that sampled.
    Through the chunked loss (token_losses), never the whole logits; Liger's kernel returns only
    a sum, so it is not used here."""
    import torch
    ce = token_losses(model, batch, chunk_tokens, temperature)
    dev = ce.device
    mask = batch["targets"].to(dev) != IGNORE
    old = batch["old_logprobs"].to(dev)
    ratio = torch.exp(torch.where(mask, -ce - old, torch.zeros_like(ce)))
    adv = batch["advantages"].to(dev)
    gain = adv * ratio
    if clip > 0:
        gain = torch.minimum(gain, adv * ratio.clamp(1 - clip, 1 + clip))
    return -(gain * mask).sum()


def loss_sum(model, batch: dict, chunk_tokens: int, kernel: str = "chunked", kd: dict | None = None):
    """Summed loss of the batch's target tokens (a 0-d tensor with grad): Liger's fused kernel
    (kernel='liger', GPUs), the chunked loss, or with chunk_tokens=0 the full logits; kd: with
    the top-k KL term (never through Liger, which returns only its cross-entropy)."""
    if kd and "kd_ids" in batch:
        return token_losses(model, batch, chunk_tokens, kd=kd).sum()
    if chunk_tokens > 0 and kernel == "liger":
        from rdistill.train.chunked_loss import head_as_loss
        with head_as_loss(model, batch["targets"], chunk_tokens, kernel):
            return model(**_inputs(model, batch)).logits.sum()
    return token_losses(model, batch, chunk_tokens).sum()
