"""Ulysses sequence parallelism: one long packed row spread over `train.sequence_parallel_size`
ranks, through DeepSpeed's integration for HF models (deepspeed.runtime.sequence_parallel.
ulysses_sp.UlyssesSPAttentionHF, the ALST work).

Ranks r*sp .. r*sp+sp-1 form one SP group (DeepSpeed's parallel_state_sp layout): each reads the
same rows and keeps its own contiguous slice of the tokens. Everything outside attention is
per-token, so it runs on the slice; in each attention layer an all-to-all trades the sequence
split for a head split (every rank then sees the whole row for heads/sp of the heads), and a
second all-to-all trades back. Each rank's loss is its slice's loss sum over the loss tokens of
the whole row, and DeepSpeed (given the SP groups as `mpu`) sums gradients over the SP group and
averages over the data-parallel replicas, so the gradient is the one of the unsplit row.

Packing: the position ids are gathered whole inside attention. flash-attention-2 turns their
resets into varlen cu_seqlens (transformers' packed path); for sdpa the wrapper below turns them
into a block-diagonal causal mask, since DeepSpeed's wrapper drops the model's (slice-sized) mask.
gloo on CPU has all_to_all_single in this torch (2.13), so the same code runs in CPU tests.
"""

from __future__ import annotations

from rdistill.errors import ConfigError


def check_sequence_parallel(sp: int, num_workers: int, model_config, attn: str = "sdpa") -> None:
    """One-line errors for a sequence_parallel_size the workers or the model cannot take."""
    if sp <= 1:
        return
    if num_workers % sp:
        raise ConfigError(f"train.sequence_parallel_size={sp} must divide train.num_workers={num_workers} "
                          "(each group of that many workers shares one row)")
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if heads % sp:
        raise ConfigError(f"train.sequence_parallel_size={sp} must divide the student's attention heads "
                          f"({heads}): Ulysses splits the heads over the group")
    if kv % sp and sp % kv:
        raise ConfigError(f"train.sequence_parallel_size={sp} and the student's {kv} key/value heads must "
                          "divide one another")
    if attn == "eager":
        raise ConfigError("sequence parallelism needs sdpa or flash-attention-2, not eager attention")


def block_causal_mask(position_ids):
    """(B, 1, T, T) bool: causal within each run of increasing positions (a packed sample)."""
    import torch
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    seg = starts.cumsum(-1)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _packed_sdpa(sdpa):
    """sdpa that honours position-id resets when it gets no mask (the whole gathered row). The
    mask is built once per row, not once per layer: every layer gathers the same positions."""
    import torch
    last: dict = {}

    def attend(module, query, key, value, attention_mask, *args, **kwargs):
        pos = kwargs.get("position_ids")
        if attention_mask is None and pos is not None and pos.shape[-1] == query.shape[2]:
            pos = pos.to(query.device)
            if not (last and last["pos"].shape == pos.shape and torch.equal(last["pos"], pos)):
                last.update(pos=pos, mask=block_causal_mask(pos))
            attention_mask = last["mask"]
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    return attend


def setup_ulysses(model_dir: str, attn: str, sp: int):
    """Make the SP groups and route `attn` through Ulysses in this process (call after
    deepspeed.init_distributed, before the model's first forward); returns the `mpu` that
    deepspeed.initialize needs. The micro-batch is one row (the loop flattens it)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if attn == "sdpa":
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _packed_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"])
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model_dir, core_attn_implementation=attn, sequence_parallel_size=sp,
        micro_batch_size=1, seq_length_is_variable=True)


def grad_scale(sp: int, zero_stage: int) -> float:
    """Factor on each rank's loss so that DeepSpeed's reduction yields the unsplit row's gradient.
    DeepSpeed 0.19.8 sums the SP group's gradients and averages over the data-parallel replicas
    in ZeRO 0-2 (and ZeRO-3's contiguous path), but ZeRO-3's reduce-scatter (the default,
    pinned in ds_config) averages over all ranks, i.e. sp times more. The 2-rank test pins both."""
    return float(sp) if sp > 1 and zero_stage == 3 else 1.0


def shard(batch: dict, rank: int, sp: int) -> dict:
    """This rank's contiguous slice of a (1, T) batch whose T is a multiple of sp."""
    T = batch["input_ids"].shape[1]
    assert T % sp == 0, f"row length {T} is not a multiple of sequence_parallel_size={sp}"
    n = T // sp
    out = dict(batch)
    for k in ("input_ids", "position_ids", "targets", "advantages", "old_logprobs", "kd_ids", "kd_logprobs"):
        if k in batch:
            out[k] = batch[k][:, rank * n:(rank + 1) * n]
    return out
