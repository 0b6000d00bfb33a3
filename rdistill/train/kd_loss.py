"""The top-k KL term of offline logit distillation (train.kd), a chunk of tokens at a time.

For each loss token: KL(p_T || p_S) over the teacher's top-k tokens, p_T the teacher's top-k
probabilities renormalised to sum to 1 (its logprobs were captured at temperature T), p_S the
student's softmax(logits / T) at the same ids; DistillKit's top-k form. Each chunk runs under
activation checkpointing, so only one chunk's [tokens, vocab] logits live at a time, in forward
and again in backward (as the chunked cross-entropy does).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

PAD_LOGPROB = -1.0e4
"""Stored for missing top-k entries: probability exactly 0 after renormalisation."""


def _chunk_kl(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, tlp: torch.Tensor, t: float) -> torch.Tensor:
    student = torch.log_softmax((h @ w.t()).float() / t, -1).gather(1, ids)
    teacher = torch.log_softmax(tlp.float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def logits_kl(logits: torch.Tensor, ids: torch.Tensor, tlp: torch.Tensor, t: float) -> torch.Tensor:
    """The same KL from full logits (..., V) (the reference the chunked path is tested against)."""
    student = torch.log_softmax(logits.float() / t, -1).gather(-1, ids)
    teacher = torch.log_softmax(tlp.float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def topk_kl(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, tlp: torch.Tensor, t: float,
            chunk: int) -> torch.Tensor:
    """Per-token KL (N,) for hidden states h (N, H), LM-head weight w (V, H), teacher top-k ids and
    logprobs (N, k)."""
    out = [checkpoint(_chunk_kl, h[s:s + chunk], w, ids[s:s + chunk].long(), tlp[s:s + chunk], t,
                      use_reentrant=False) for s in range(0, h.shape[0], max(1, chunk))]
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)
