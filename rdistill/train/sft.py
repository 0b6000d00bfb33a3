"""Supervised fine-tuning of one student as a Ray Train TorchTrainer job with DeepSpeed workers.

    from rdistill.train.sft import train_sft
    metrics = train_sft(base_dir, ["math.jsonl"], "out/math", TrainConfig(...), storage_dir="ckpt")

The driver checks the inputs and tokenizes/packs the SFT set before any worker starts (a bad set
fails in one line), writes the packed rows next to the checkpoints, runs the trainer, and copies
the final checkpoint's HF model to `out_dir` (built under a temporary name, then renamed).
Rerunning with the same storage_dir and name continues from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from rdistill.config import TrainConfig
from rdistill.data.packing import build_rows, padding_share, save_rows, step_rows
from rdistill.data.sft import SFTDataError, check_tokenizer, tokenize_files
from rdistill.log import log

CURVE_POINTS = 200  # loss-curve points kept in the returned metrics (the full curve is in metrics.jsonl)


def resolve_precision(precision: str, device: str) -> bool:
    """True for bf16: 'auto' is bf16 on GPUs, fp32 on CPUs (CPU bf16 matmuls are slow without AMX)."""
    return precision == "bf16" or (precision == "auto" and device == "gpu")


def _attn(device: str) -> str:
    """flash-attention-2 where installed on GPUs, else sdpa; both honour position-id resets
    (FA2 through its varlen kernel on a one-row batch, see rdistill.train.forward)."""
    if device == "gpu":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def prepare_data(model_dir: str, sft_files: list[str], cfg: TrainConfig, data_file: Path) -> dict:
    """Check the student and tokenize, filter and pack the SFT set into the rows directory
    `data_file`; raises SFTDataError (ConfigError for a sequence_parallel_size the student
    cannot split) before any training when the set, the tokenizer or max_len cannot work."""
    from transformers import AutoConfig, AutoTokenizer
    from rdistill.data.chat_template import apply_chat_template_override
    from rdistill.data.tokenize_ray import tokenize_and_pack, use_ray_data
    from rdistill.train.sequence_parallel import check_sequence_parallel
    try:
        tok = apply_chat_template_override(AutoTokenizer.from_pretrained(model_dir), cfg.chat_template)
    except ValueError as e:
        raise SFTDataError(str(e)) from None
    mc = AutoConfig.from_pretrained(model_dir)
    limit = getattr(mc, "max_position_embeddings", None)
    if limit is not None and cfg.max_len > limit:
        raise SFTDataError(f"train.max_len={cfg.max_len} is more than the student {model_dir} can hold "
                           f"(max_position_embeddings={limit}): lower train.max_len")
    check_sequence_parallel(cfg.sequence_parallel_size, cfg.num_workers, mc)
    data_file = Path(data_file)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_file.with_name(f".{data_file.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if use_ray_data(cfg.tokenize_with_ray_data, list(sft_files)):
        check_tokenizer(tok)
        lens, rows, st = tokenize_and_pack(str(Path(model_dir).absolute()), cfg.chat_template, list(sft_files),
                                           cfg.max_len, cfg.packing, tmp)
    else:
        samples, st = tokenize_files(tok, sft_files, cfg.max_len)
        rows = build_rows(samples, cfg.max_len, cfg.packing)
        save_rows(tmp, samples, rows)
        lens = [len(s.input_ids) for s in samples]
        del samples
    if data_file.is_dir():
        shutil.rmtree(data_file)
    elif data_file.exists():
        data_file.unlink()
    os.replace(tmp, data_file)
    # Padding share of both layouts in the same shuffled order, for the report.
    packed = [sum(lens[i] for i in r) for r in build_rows(lens, cfg.max_len, True)]
    order = lambda xs: [xs[i] for i in step_rows(len(xs), 0, len(xs), cfg.seed)]  # noqa: E731
    return {"samples": st.samples, "kept": st.kept, "dropped_too_long": st.dropped_too_long,
            "no_assistant_tokens": st.no_assistant_tokens, "tokens": st.tokens,
            "loss_tokens": st.loss_tokens, "longest": st.longest, "rows": len(rows),
            "padding_share_packed": round(padding_share(order(packed), cfg.micro_batch_size), 4),
            "padding_share_unpacked": round(padding_share(order(lens), cfg.micro_batch_size), 4),
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


@dataclasses.dataclass
class PreparedSFT:
    """A checked, tokenized and packed SFT job, ready for `fit_sft`."""
    model_dir: str
    out_dir: str
    cfg: TrainConfig
    device: str
    name: str
    storage: Path
    data_file: Path
    data: dict
    total_steps: int
    objective: str = "sft"
    """sft, or policy_gradient for rows with advantages (rdistill.train.loop.LoopConfig)."""
    temperature: float = 1.0
    """The policy's temperature (policy_gradient)."""
    clip: float = 0.0
    """PPO's ratio clip of the policy-gradient loss (0: none)."""


def prepare_sft(model_dir: str, sft_files: list[str], out_dir: str, cfg: TrainConfig, device: str = "cpu",
                name: str = "sft", storage_dir: str | None = None, kd_teacher: str | None = None) -> PreparedSFT:
    """Everything before training: fails with a one-line SFTDataError on a bad set or student.
    With train.kd.weight > 0, `kd_teacher`'s top-k logprobs are captured into the rows."""
    storage = Path(storage_dir or tempfile.mkdtemp(prefix="rdistill-train-")).absolute()
    data_file = storage / f"{name}-rows"  # a directory of memory-mapped .npy files
    if cfg.kd.weight > 0:
        from rdistill.train.kd import check_kd_teacher
        check_kd_teacher(kd_teacher or "", model_dir)
    data = prepare_data(model_dir, list(sft_files), cfg, data_file)
    if cfg.kd.weight > 0:
        from rdistill.config import EngineConfig
        from rdistill.train.kd import capture_topk
        eng = EngineConfig(dtype="float32" if device == "cpu" else "auto", max_model_len=cfg.max_len + 1)
        data.update(capture_topk(data_file, kd_teacher, cfg.kd, device, eng))
        log.info("[%s] KD: teacher top-%d logprobs at every loss token (%d bytes per token)", name, cfg.kd.top_k,
                 data["kd_bytes_per_token"])
    # Ranks of one sequence-parallel group train on the same rows: num_workers / sp replicas.
    per_step = cfg.micro_batch_size * cfg.grad_accum * (cfg.num_workers // cfg.sequence_parallel_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * data["rows"] / per_step))
    return PreparedSFT(str(Path(model_dir).absolute()), out_dir, cfg, device, name, storage, data_file,
                       data, total)


def prepare_rows(model_dir: str, rows_dir: str, out_dir: str, cfg: TrainConfig, device: str = "cpu",
                 name: str = "rows", storage_dir: str | None = None, objective: str = "sft",
                 temperature: float = 1.0, clip: float = 0.0) -> PreparedSFT:
    """A job on rows already tokenized and packed (rdistill.data.packing.save_token_rows), e.g.
    on-policy distillation's sampled completions with their per-token advantages."""
    from transformers import AutoTokenizer

    from rdistill.data.packing import PackedRows
    rows = PackedRows(rows_dir)
    if objective == "policy_gradient" and set(rows.floats) != {"advantages", "old_logprobs"}:
        raise SFTDataError(f"{rows_dir}: the policy-gradient loss needs the advantages and old_logprobs columns")
    tok = AutoTokenizer.from_pretrained(model_dir)
    storage = Path(storage_dir or tempfile.mkdtemp(prefix="rdistill-train-")).absolute()
    n = len(rows)
    per_step = cfg.micro_batch_size * cfg.grad_accum * (cfg.num_workers // cfg.sequence_parallel_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * n / per_step))
    data = {"samples": n, "kept": n, "dropped_too_long": 0, "rows": n, "tokens": int(rows.offsets[-1]),
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    return PreparedSFT(str(Path(model_dir).absolute()), out_dir, cfg, device, name, storage, Path(rows_dir),
                       data, total, objective, temperature, clip)


def train_sft(model_dir: str, sft_files: list[str], out_dir: str, cfg: TrainConfig, device: str = "cpu",
              name: str = "sft", storage_dir: str | None = None, *, _fault: list | None = None) -> dict:
    """Fine-tune `model_dir` on the chat SFT files; write the HF model to `out_dir`; return metrics
    (loss curve, steps, tokens/s, padding share, dropped-too-long count, ...).

    `_fault` (tests): [{"rank": r, "step": s, "once_file": path}, ...] SIGKILLs that worker when it
    reaches that step, once per once_file."""
    return fit_sft(prepare_sft(model_dir, sft_files, out_dir, cfg, device, name, storage_dir), _fault=_fault)


def fit_sft(job: PreparedSFT, *, _fault: list | None = None) -> dict:
    """Run the TorchTrainer of a prepared job (blocks) and write its HF model; returns metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rdistill.config import RayConfig
    from rdistill.topology import init_ray, runtime_env, train_scaling
    from rdistill.train.loop import HF_DIR, STATE, LoopConfig, train_loop

    t0 = time.time()
    cfg, name, data, total, device = job.cfg, job.name, job.data, job.total_steps, job.device
    bf16 = resolve_precision(cfg.precision, device)
    log.info("[%s] %d samples kept of %d (%d too long), %d rows, %d steps, %s, ZeRO-%d, %d worker(s)",
             name, data["kept"], data["samples"], data["dropped_too_long"], data["rows"], total,
             "bf16" if bf16 else "fp32", cfg.zero_stage, cfg.num_workers)
    if not ray.is_initialized():
        init_ray(RayConfig())
    loop_cfg = {"loop": LoopConfig(
        name=name, model_dir=job.model_dir, data_file=str(job.data_file), train=cfg, total_steps=total,
        device=device, bf16=bf16, attn=_attn(device), pad_id=data["pad_id"], log_every=max(1, total // 20),
        progress_file=str(job.storage / f"{name}-progress.jsonl"), faults=_fault or [],
        snapshot=str(job.storage / name / "checkpoint_manager_snapshot.json"),
        snapshots=str(job.storage / f"{name}-snapshots"), objective=job.objective,
        temperature=job.temperature, clip=job.clip)}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg, scaling_config=ScalingConfig(**train_scaling(device, cfg)),
        run_config=RunConfig(name=name, storage_path=str(job.storage), worker_runtime_env=runtime_env(),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"[{name}] training ended without a final checkpoint: see the worker logs above")

    out = Path(job.out_dir).absolute()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text())
        shutil.copytree(Path(d) / HF_DIR, tmp)
    with (tmp / "metrics.jsonl").open("w") as f:
        for rec in state["history"]:
            f.write(json.dumps(rec) + "\n")
    if cfg.save_steps:  # written by the workers as they passed those steps (kept across resumes)
        shutil.copytree(job.storage / f"{name}-snapshots", tmp / "snapshots")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)

    h = state["history"]
    stride = max(1, math.ceil(len(h) / CURVE_POINTS))
    toks = sum(r["tokens"] for r in h)
    metrics = {k: v for k, v in data.items() if k != "pad_id"}
    metrics.update({
        "steps": state["step"], "total_steps": total, "workers": cfg.num_workers, "zero_stage": cfg.zero_stage,
        "precision": "bf16" if bf16 else "fp32", "packing": cfg.packing,
        "first_loss": h[0]["loss"], "final_loss": h[-1]["loss"],
        "loss_curve": [[r["step"], round(r["loss"], 5)] for r in h[::stride] + ([h[-1]] if (len(h) - 1) % stride else [])],
        "tokens_per_s": round(toks / state["train_time_s"], 1) if state["train_time_s"] else 0.0,
        "padding_share": round(1 - toks / max(1, sum(r["padded"] for r in h)), 4),
        "train_time_s": round(state["train_time_s"], 2), "wall_s": round(time.time() - t0, 2),
        "resumed_from_steps": state.get("resumed_from", []),
        "workers_window": [round(state["workers_started"], 3), round(state["workers_finished"], 3)],
    })
    log.info("[%s] done: %d steps, loss %.4f -> %.4f, %.0f tok/s, padding %.1f%%", name, metrics["steps"],
             metrics["first_loss"], metrics["final_loss"], metrics["tokens_per_s"], 100 * metrics["padding_share"])
    return metrics
