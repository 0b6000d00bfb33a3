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


def evaluated_models(cfg: ExperimentConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Every model the evaluate stage scores, in table order, with the splits it answers: the
    one list the stage builds its targets from and the dry run prints."""
    test, dev = ("test",), ("test", "dev") if needs_selection(cfg) else ("test",)
    out = [("base", test)] + [(f"branch:{d}", test) for d in cfg.domains]
    if cfg.train.mixture_baseline:
        out.append((MIXTURE, test))
    out += [(f"merge:{name}", dev) for name in cfg.merge.names()]
    if "distill" in cfg.stages:  # the merge distilled on-policy from the branches
        out.append((DISTILLED_ROW, test))
    if cfg.eval.include_teacher:
        out.append(("teacher", test))
    return out


def eval_targets(cfg: ExperimentConfig, resolve) -> list[Target]:
    """Every model of the run (`evaluated_models`), with its engine settings. `resolve` maps a
    model reference to a path (StageContext.model)."""
    out = []
    for name, splits in evaluated_models(cfg):
        if name == "teacher":
            t = cfg.teacher
            model = resolve(t.model) if t.backend == "vllm" else t.model
            spec = LLMSpec.from_teacher(t, model, cfg.eval.sampling, cfg.device)
            out.append(Target(name, dataclasses.replace(spec, name=name, batch_size=cfg.eval.batch_size), splits))
        else:
            ref = DISTILLED if name == DISTILLED_ROW else name
            out.append(Target(name, _student_spec(cfg, name, resolve(ref)), splits))
    return out
