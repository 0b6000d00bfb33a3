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


def token_losses(model, batch: dict, chunk_tokens: int = 0):
    """(B, T) cross-entropy of each target token (0 where the target is IGNORE).

    chunk_tokens > 0: through `ChunkedLinearCE` (never the whole [tokens, vocab] logits);
    0: the full logits in fp32 (the reference the chunked loss is tested against)."""
    import torch.nn.functional as F
    if chunk_tokens > 0:
        from rdistill.train.chunked_loss import head_as_loss
        with head_as_loss(model, batch["targets"], chunk_tokens):
            return model(**_inputs(model, batch)).logits[..., 0]
    out = model(**_inputs(model, batch))
    tgt = batch["targets"].to(out.logits.device)
    return F.cross_entropy(out.logits.float().transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")


def loss_sum(model, batch: dict, chunk_tokens: int, kernel: str = "chunked"):
    """Summed loss of the batch's target tokens (a 0-d tensor with grad): Liger's fused kernel
    (kernel='liger', GPUs), the chunked loss, or with chunk_tokens=0 the full logits."""
    if chunk_tokens > 0 and kernel == "liger":
        from rdistill.train.chunked_loss import head_as_loss
        with head_as_loss(model, batch["targets"], chunk_tokens, kernel):
            return model(**_inputs(model, batch)).logits.sum()
    return token_losses(model, batch, chunk_tokens).sum()
