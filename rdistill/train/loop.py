"""The per-worker training function of a branch's TorchTrainer: DeepSpeed SFT on packed rows.

Ray Train starts `num_workers` of these with a process group set up (gloo on CPU, nccl on GPU);
DeepSpeed reuses it. Every worker memory-maps the same packed-rows directory and reads only its
own slice of each optimizer step's rows, so data order depends only on (seed, step) and a resumed
run continues exactly where its checkpoint says. With train.sequence_parallel_size = sp, the sp
workers of a group read the same rows and each trains on its slice of the tokens
(rdistill.train.sequence_parallel); the loss never builds the whole logits
(rdistill.train.chunked_loss). Checkpoints (DeepSpeed state of every rank, plus the step and
the metric history) go through `ray.train.report`; the last report carries the HF model instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rdistill.config import TrainConfig

STATE = "state.json"
DS_TAG = "ds"
HF_DIR = "hf"


@dataclass
class LoopConfig:
    """What the driver hands every worker (through TorchTrainer's train_loop_config)."""
    name: str
    """The branch's run name (log prefix, Ray Train run name)."""
    model_dir: str
    """HF directory of the model the branch starts from."""
    data_file: str
    """Packed-rows directory (rdistill.data.packing), memory-mapped by every rank."""
    train: TrainConfig
    """The branch's resolved training settings."""
    total_steps: int
    """Optimizer steps of the whole run (the scheduler's horizon)."""
    device: str
    """'cpu' or 'gpu'."""
    bf16: bool
    """Train in bf16 (resolved from train.precision and the device)."""
    attn: str
    """HF attention implementation: sdpa, or flash_attention_2 where installed."""
    pad_id: int
    """The tokenizer's pad id for padded rows."""
    log_every: int
    """Rank 0 prints a progress line every this many steps."""
    progress_file: str | None
    """JSONL of per-step metrics, appended by rank 0 (tailed by tracking and the benchmarks)."""
    snapshot: str
    """Ray Train's checkpoint-manager snapshot (the fault hook waits for a registered checkpoint)."""
    snapshots: str
    """Folder of the HF snapshots written at train.save_steps."""
    faults: list[dict] = field(default_factory=list)
    """Test hook: kill rank `rank` at step `step` once (`once_file` marks it done)."""
    objective: str = "sft"
    """sft: cross-entropy of the targets; policy_gradient: the importance-weighted policy
    gradient of rows carrying `advantages` and `old_logprobs` (on-policy distillation,
    rdistill.train.forward.policy_gradient_sum)."""
    temperature: float = 1.0
    """policy_gradient: the policy is softmax(logits / temperature) (the sampling temperature)."""
    clip: float = 0.0
    """policy_gradient: PPO's ratio clip (0: the plain importance-weighted gradient)."""


def ds_config(tc: TrainConfig, bf16: bool) -> dict:
    """DeepSpeed config from a TrainConfig. torch_adam: DeepSpeed's own CPU/fused Adam would
    be JIT-compiled on first use (minutes); torch's AdamW needs no build."""
    zero: dict = {"stage": tc.zero_stage}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # full weights for the HF save
        zero["reduce_scatter"] = True  # the gradient averaging sequence_parallel.grad_scale assumes
    sp = tc.sequence_parallel_size
    # Read by DeepSpeed where no mpu is passed (HF's ZeRO-3 loading): batch = per-replica counts.
    extra = {"sequence_parallel_size": sp} if sp > 1 else {}
    return {**extra,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": tc.lr, "betas": [tc.adam_beta1, tc.adam_beta2], "eps": tc.adam_eps,
            "weight_decay": tc.weight_decay, "torch_adam": True}},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _no_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory op (minutes) that only its
    inference_all_reduce uses; training collectives go through the gloo process group."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _save_hf(engine, model_dir: str, out: Path, rank: int, bf16: bool) -> None:
    """Write the full model as a plain HF directory (rank 0). With ZeRO-3 every rank takes part
    in gathering the partitioned weights."""
    import torch
    from transformers import AutoTokenizer
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()  # collective
    else:
        sd = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    model = engine.module
    model.config.dtype = torch.bfloat16 if bf16 else torch.float32
    model.config.use_cache = True
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    model.save_pretrained(out, state_dict=sd, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def train_loop(loop_config: dict) -> None:
    """TorchTrainer's entry: `loop_config` is {"loop": LoopConfig} (Ray passes a dict)."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from rdistill.data.packing import PackedRows, step_rows
    from rdistill.data.sft import IGNORE
    from rdistill.train.chunked_loss import liger_available
    from rdistill.train.forward import loss_sum, policy_gradient_sum
    from rdistill.train.sequence_parallel import grad_scale, setup_ulysses, shard

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config: LoopConfig = loop_config["loop"]
    tc, total = config.train, config.total_steps
    say = (lambda *a: print(f"[{config.name}]", *a, flush=True)) if rank == 0 else (lambda *a: None)

    t_start = time.perf_counter()
    ckpt = ray.train.get_checkpoint()
    state: dict = {"step": 0, "history": [], "train_time_s": 0.0, "workers_started": time.time()}
    if ckpt:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE).read_text())
            if state.get("final"):  # the run had finished: hand back the same final checkpoint
                tmp = Path(tempfile.mkdtemp(prefix="rdistill-final-"))
                shutil.copytree(d, tmp, dirs_exist_ok=True)
                ray.train.report(state["last"], checkpoint=Checkpoint.from_directory(tmp))
                return

    import deepspeed
    from transformers import AutoModelForCausalLM, get_scheduler
    gpu = config.device == "gpu"
    if not gpu:
        _no_shm_comm_build()
    bf16 = config.bf16
    dsc = ds_config(tc, bf16)
    deepspeed.init_distributed()  # wraps Ray Train's process group (ZeRO-3 loading needs it first)
    sp = tc.sequence_parallel_size
    # SP groups and the Ulysses attention wrapper, before the model exists (ZeRO-3 loads into it).
    mpu = setup_ulysses(config.model_dir, config.attn, sp) if sp > 1 else None
    keep = None
    if tc.zero_stage == 3:  # partition weights while loading instead of a full copy per rank
        from transformers.integrations.deepspeed import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(dsc)  # noqa: F841 (must stay alive during from_pretrained)
    torch.manual_seed(tc.seed)
    # bf16 weights in the module (DeepSpeed keeps fp32 master copies in the optimizer).
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation=config.attn)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    warmup = int(round(tc.warmup_ratio * total))
    engine, _, _, sched = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=dsc, mpu=mpu,
        lr_scheduler=lambda opt: get_scheduler(tc.scheduler, opt, num_warmup_steps=warmup,
                                               num_training_steps=total))
    del keep
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
        say(f"resumed from step {state['step']}")
        state["resumed_from"] = state.get("resumed_from", []) + [state["step"]]

    say(f"rank 0 of {world}: model and DeepSpeed ready in {time.perf_counter() - t_start:.1f}s")
    rows = PackedRows(config.data_file)  # memory-mapped: this rank reads only its rows
    mb, ga = tc.micro_batch_size, tc.grad_accum
    per_rank = mb * ga
    dp_rank, dp_world, sp_rank = rank // sp, world // sp, rank % sp
    # One (1, T) row per micro-batch for FA2's varlen path and for SP (padded to a multiple of sp).
    flat = sp > 1 or config.attn == "flash_attention_2"
    chunk, scale = tc.loss_chunk_tokens, grad_scale(sp, tc.zero_stage)
    kernel = "liger" if gpu and chunk and liger_available() else "chunked"
    loss_how = "full logits" if not chunk else "Liger fused" if kernel == "liger" else f"{chunk}-token chunks"
    say(f"loss: {loss_how}, attention {config.attn}, sequence parallel {sp}, {dp_world} data-parallel replica(s)")
    # offline logit KD: rows that carry the teacher's top-k logprobs (train.kd.weight > 0)
    kd = {"weight": tc.kd.weight, "temperature": tc.kd.temperature, "ce_weight": tc.kd.ce_weight} \
        if tc.kd.weight > 0 else None
    progress = Path(config.progress_file) if config.progress_file and rank == 0 else None
    engine.train()
    for step in range(state["step"], total):
        for f in config.faults:  # test hook: a worker dying mid-run, once per once_file
            if rank == f["rank"] and step == f["step"] and not os.path.exists(f["once_file"]):
                _wait_registered(config.snapshot, step // tc.checkpoint_every * tc.checkpoint_every)
                Path(f["once_file"]).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        mine = step_rows(len(rows), step, per_rank * dp_world, tc.seed)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, loss tokens, real tokens, padded tokens
        for m in range(ga):
            b = rows.batch(mine[m * mb:(m + 1) * mb], config.pad_id, flat=flat, multiple=sp)
            n = (b["targets"] != IGNORE).sum()  # of the whole row: SP slices sum to the row's mean
            if sp > 1:
                b = shard(b, sp_rank, sp)
            if config.objective == "policy_gradient":
                ls = policy_gradient_sum(engine, b, chunk, config.temperature, config.clip)
            else:
                ls = loss_sum(engine, b, chunk, kernel, kd)
            engine.backward(ls * scale / n)
            engine.step()
            lead = float(sp_rank == 0)  # count a group's row once
            stats += torch.tensor([ls.detach().item(), lead * n.item(), lead * b["tokens"], lead * b["padded"]],
                                  dtype=torch.float64)
        dist.all_reduce(stats)
        dt = time.perf_counter() - t0
        state["train_time_s"] += dt
        rec = {"step": step + 1, "loss": stats[0].item() / stats[1].item(), "lr": sched.get_last_lr()[0],
               "tokens": int(stats[2]), "padded": int(stats[3]), "tokens_per_s": stats[2].item() / dt,
               "padding_share": 1 - stats[2].item() / stats[3].item(), "step_time_s": dt}
        state["history"].append(rec)
        state["step"] = step + 1
        if progress:
            with progress.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            say(f"step {step + 1}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                f"{rec['tokens_per_s']:.0f} tok/s")
        if step + 1 in (tc.save_steps or ()) and step + 1 < total:
            _save_hf(engine, config.model_dir, Path(config.snapshots) / f"step-{step + 1}", rank, bf16)
            say(f"snapshot of step {step + 1} written")
        if (step + 1) % tc.checkpoint_every == 0 and step + 1 < total:
            tmp = Path(tempfile.mkdtemp(prefix="rdistill-ckpt-"))
            engine.save_checkpoint(str(tmp), tag=DS_TAG)  # every rank writes its shards
            if rank == 0:
                (tmp / STATE).write_text(json.dumps(state))
            ray.train.report(_summary(state, total), checkpoint=Checkpoint.from_directory(tmp))
            shutil.rmtree(tmp, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix="rdistill-final-"))
    _save_hf(engine, config.model_dir, tmp / HF_DIR, rank, bf16)
    state["final"] = True
    state["workers_finished"] = time.time()
    state["last"] = _summary(state, total)
    if rank == 0:
        (tmp / STATE).write_text(json.dumps(state))
    ray.train.report(state["last"], checkpoint=Checkpoint.from_directory(tmp))
    shutil.rmtree(tmp, ignore_errors=True)


def _wait_registered(snapshot: str, step: int, timeout_s: float = 120.0) -> None:
    """Wait until Ray Train's controller has registered the checkpoint of `step`: it polls the
    workers every few seconds, and a checkpoint reported just before a crash is not yet known."""
    deadline = time.time() + timeout_s
    while step and time.time() < deadline:
        try:
            snap = json.loads(Path(snapshot).read_text())
            if (snap.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)


def _summary(state: dict, total: int) -> dict:
    h = state["history"]
    toks = sum(r["tokens"] for r in h)
    return {"step": state["step"], "total_steps": total, "loss": h[-1]["loss"] if h else None,
            "tokens_per_s": toks / state["train_time_s"] if state["train_time_s"] else 0.0}
