"""The training forward pass on packed rows: per-token loss with no attention across samples."""

from __future__ import annotations

from rdistill.data.sft import IGNORE


def token_losses(model, batch: dict):
    """(B, T) cross-entropy of each target token (0 where the target is IGNORE).

    No attention_mask and no cache: transformers then derives a block-diagonal causal mask from
    the position-id resets (see rdistill.data.packing), so packed samples never see each other.
    """
    import torch.nn.functional as F
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), position_ids=batch["position_ids"].to(dev),
                use_cache=False)
    logits = out.logits.float()
    tgt = batch["targets"].to(dev)
    return F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")
