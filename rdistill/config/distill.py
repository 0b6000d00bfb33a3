"""Typed config of the distill stage: on-policy distillation of the merged student from the
branches (rdistill/distill/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from rdistill.config.fields import fail, spec

# train settings the distill update sets itself (its rows, steps and loss: policy gradient or top-k KL)
DISTILL_TRAIN_FIXED = ("mixture_baseline", "save_steps", "epochs", "max_steps", "packing", "chat_template",
                       "tokenize_with_ray_data", "kd")


@dataclass
class KDConfig:
    """Offline logit distillation in SFT: the teacher's top-k logprobs at every loss token of the
    SFT rows (captured by prefilling the rows' own token ids on a vLLM engine, so they align with
    the student's tokens exactly; the teacher must share the student's tokenizer) and a top-k KL
    term added to the cross-entropy."""
    weight: float = spec(0.0, ge=0.0)
    """Weight of the KL term (0: off, plain SFT). Loss per token: CE + weight * T^2 *
    KL(teacher top-k, renormalised || student), DistillKit's form."""
    temperature: float = spec(1.0, gt=0.0)
    """Temperature T of both distributions in the KL term."""
    top_k: int = spec(16, gt=0)
    """Teacher logprobs kept per token (stored as int32 ids + float16 logprobs: 6 * top_k bytes
    per token)."""
    ce_weight: float = spec(1.0, ge=0.0)
    """Weight of the cross-entropy term beside the KL (0: the KL alone, as the distill stage's
    topk_kl loss trains, whose targets are the student's own samples)."""
    teacher: Optional[str] = None
    """Model reference of the KD teacher (None: teacher.model, which must then be a local vllm
    model with the student's tokenizer, as the toy teacher is)."""


@dataclass
class DistillConfig:
    student: str = "merged"
    """Model reference of the student distilled: merged (the run's merge: the evaluate stage's
    dev choice of an earlier run, else the merge stage's first candidate), merge:<name>, base,
    a path."""
    teachers: Dict[str, str] = field(default_factory=dict)
    """Teacher of each domain, a model reference (default, when empty: branch:<domain> for every
    domain). A teacher must share the student's tokenizer and be a local model that a vLLM
    engine scores (prompt logprobs): a branch, toy:teacher, a same-family checkpoint."""
    rounds: int = spec(2, ge=1)
    """Rounds of sample -> score -> update; each round samples from the previous round's model
    (a frozen snapshot: the samples of a round are one round stale by the end of its update)."""
    prompts_per_domain: int = spec(64, gt=0)
    """Train prompts of each domain sampled per round (a different slice each round, cycling)."""
    samples_per_prompt: int = spec(2, gt=0)
    """Completions the student samples per prompt (k)."""
    temperature: float = spec(1.0, gt=0.0)
    """The student samples at this temperature, and its policy (sampling, logprobs and the
    update's loss) is softmax(logits / temperature)."""
    teacher_temperature: Optional[float] = spec(None, gt=0.0)
    """Teachers' logprobs are log_softmax(logits / this) (None: `temperature`, the teacher
    scored as it would sample beside the student)."""
    top_p: float = spec(1.0, gt=0.0, le=1.0)
    """Nucleus mass of the student's sampling (1.0: on-policy for the whole distribution)."""
    max_tokens: int = spec(256, gt=0)
    """Most tokens per sampled completion."""
    lr: float = spec(1e-5, gt=0)
    """Learning rate of each round's update."""
    loss: str = spec("topk_kl", choices=["topk_kl", "reverse_kl"])
    """The update's loss on the student's samples. topk_kl: at every completion position,
    KL(teacher's top-k renormalised || student) (GKD's on-policy form, the offline KD term of
    rdistill.train.kd_loss with no cross-entropy): every position learns the teacher's whole
    distribution, including where the student sampled the right token but was unsure.
    reverse_kl: the importance-weighted policy gradient of the sampled tokens' advantages
    (teacher minus student logprob, the per-token reverse KL; Thinking Machines' and Qwen3's
    form): only the sampled token moves."""
    top_k: int = spec(16, gt=0)
    """Teacher logprobs kept per position for topk_kl (above 20, the engine's max_logprobs is
    raised to it)."""
    baseline: str = spec("mean", choices=["mean", "none"])
    """Subtracted from each domain's per-token advantages in a round: their mean (a constant
    baseline: same expected gradient, less variance; a student behind its teacher otherwise
    pushes down almost every token it sampled) or nothing."""
    clip: float = spec(0.2, ge=0.0)
    """PPO ratio clip of the update (0: the plain importance-weighted policy gradient). Every
    step of a round learns from the round's snapshot's samples: the clip keeps a token from
    pulling once the policy moved its probability past 1 +- clip of the snapshot's."""
    steps_per_round: Optional[int] = spec(None, gt=0)
    """Optimizer steps per round (None: one pass over the round's packed rows)."""
    train_overrides: Dict[str, Any] = field(default_factory=lambda: {"weight_decay": 0.0, "warmup_ratio": 0.0,
                                                                     "scheduler": "constant"})
    """Settings of `train` changed for the update (workers, batch, ZeRO stage, max_len, ...).
    No weight decay by default: a zero advantage then leaves the weights as they are."""
    dev_prompts: int = spec(0, ge=0)
    """Dev prompts per domain scored before the first round and after each (the report's plot of
    dev pass@1 over rounds); 0: none."""
    dev_samples: int = spec(2, gt=0)
    """Samples per dev prompt for that curve."""
    seed: int = 0
    """Seed of the prompt order and the samples."""

    def validate(self, prefix: str) -> None:
        from rdistill.config.stages import TrainConfig
        bad = set(self.train_overrides) - set(TrainConfig.__dataclass_fields__)
        if bad:
            fail(prefix + "train_overrides", sorted(bad),
                 "allowed keys are train's: " + ", ".join(TrainConfig.__dataclass_fields__))
        fixed = set(self.train_overrides) & set(DISTILL_TRAIN_FIXED)
        if fixed:
            fail(prefix + "train_overrides", sorted(fixed), "the distill stage sets these itself (steps: "
                 "distill.steps_per_round, learning rate: distill.lr)")
        if "lr" in self.train_overrides:
            fail(prefix + "train_overrides", ["lr"], "set distill.lr")


def distill_train_config(cfg):
    """The train section of each round's update: train's settings, distill.train_overrides, the
    distill learning rate and steps, one pass over the round's rows otherwise; for topk_kl, the
    KD term alone (no cross-entropy of the student's own samples)."""
    import dataclasses
    dc = cfg.distill
    kd = KDConfig(weight=1.0, temperature=dc.temperature, top_k=dc.top_k, ce_weight=0.0) \
        if dc.loss == "topk_kl" else KDConfig()
    return dataclasses.replace(cfg.train, **dc.train_overrides, lr=dc.lr, max_steps=dc.steps_per_round, epochs=1.0,
                               packing=True, save_steps=[], mixture_baseline=False, kd=kd)
