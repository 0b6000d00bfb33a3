"""Which models the evaluate stage scores, on which splits, with which engine settings.

Rows of the final table: `base` (student.base), `branch:<domain>` (train/<domain>), each merge
candidate `merge:<name>` (merge/<name>/final) and `teacher` when eval.include_teacher. Merge
candidates are also scored on the dev split when there is more than one to choose from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rdistill.config import ExperimentConfig
from rdistill.config.fields import ConfigError
from rdistill.generate.spec import LLMSpec
from rdistill.topology import eval_tensor_parallel


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
    return LLMSpec(model=path, name=name, backend="vllm", device=cfg.device,
                   sampling=cfg.eval.sampling, max_model_len=cfg.student.max_model_len,
                   batch_size=cfg.eval.batch_size,
                   tensor_parallel_size=eval_tensor_parallel(cfg))


def needs_selection(cfg: ExperimentConfig) -> bool:
    return len(cfg.merge.candidates) > 1


def eval_targets(cfg: ExperimentConfig, resolve) -> list[Target]:
    """Every model of the run, in table order. `resolve` maps a model reference to a path
    (StageContext.model)."""
    out = [Target("base", _student_spec(cfg, "base", resolve("base")))]
    for d in cfg.domains:
        out.append(Target(f"branch:{d}", _student_spec(cfg, f"branch:{d}", resolve(f"branch:{d}"))))
    dev = ("test", "dev") if needs_selection(cfg) else ("test",)
    for c in cfg.merge.candidates:
        ref = f"merge:{c.name}"
        out.append(Target(ref, _student_spec(cfg, ref, resolve(ref)), dev))
    if cfg.eval.include_teacher:
        t = cfg.teacher
        model = resolve(t.model) if t.backend == "vllm" else t.model
        spec = LLMSpec.from_teacher(t, model, cfg.eval.sampling, cfg.device)
        out.append(Target("teacher", dataclasses.replace(spec, name="teacher", batch_size=cfg.eval.batch_size)))
    return out
