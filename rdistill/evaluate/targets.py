"""Which models the evaluate stage scores, on which splits, with which engine settings.

Rows of the final table: `base` (student.base), `branch:<domain>` (train/<domain>), each merge
candidate `merge:<name>` (merge/<name>/final), `merge+distill` (distill/model) when the distill
stage runs, and `teacher` when eval.include_teacher. Merge
candidates are also scored on the dev split when there is more than one to choose from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rdistill.config import ExperimentConfig
from rdistill.config.fields import ConfigError
from rdistill.llm.spec import LLMSpec
from rdistill.refs import DISTILLED, DISTILLED_ROW, MIXTURE


@dataclass
class Target:
    name: str
    """Row name in results.json and the table."""
    spec: LLMSpec
    splits: tuple[str, ...] = ("test",)


def _student_spec(cfg: ExperimentConfig, name: str, path: str) -> LLMSpec:
    if not (Path(path).exists() or cfg.student.base == path):
        raise ConfigError(f"model {name} is missing at {path}: run the stage that builds it "
                          f"(stages=[train,merge,...]) before evaluate")
    return LLMSpec.for_student(cfg, name, path)


def needs_selection(cfg: ExperimentConfig) -> bool:
    return len(cfg.merge.names()) > 1


def eval_targets(cfg: ExperimentConfig, resolve) -> list[Target]:
    """Every model of the run, in table order. `resolve` maps a model reference to a path
    (StageContext.model)."""
    out = [Target("base", _student_spec(cfg, "base", resolve("base")))]
    for d in cfg.domains:
        out.append(Target(f"branch:{d}", _student_spec(cfg, f"branch:{d}", resolve(f"branch:{d}"))))
    if cfg.train.mixture_baseline:
        out.append(Target(MIXTURE, _student_spec(cfg, MIXTURE, resolve(MIXTURE))))
    dev = ("test", "dev") if needs_selection(cfg) else ("test",)
    for name in cfg.merge.names():
        ref = f"merge:{name}"
        out.append(Target(ref, _student_spec(cfg, ref, resolve(ref)), dev))
    if "distill" in cfg.stages:  # the merge distilled on-policy from the branches
        out.append(Target(DISTILLED_ROW, _student_spec(cfg, DISTILLED_ROW, resolve(DISTILLED))))
    if cfg.eval.include_teacher:
        t = cfg.teacher
        model = resolve(t.model) if t.backend == "vllm" else t.model
        spec = LLMSpec.from_teacher(t, model, cfg.eval.sampling, cfg.device)
        out.append(Target("teacher", dataclasses.replace(spec, name="teacher", batch_size=cfg.eval.batch_size)))
    return out
