"""The root config of a run, and how a plain dict or OmegaConf tree becomes a validated one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rdistill.config.fields import ConfigError, check, fail, spec
from rdistill.config.distill import DistillConfig
from rdistill.config.models import DomainConfig, StudentConfig, TeacherConfig
from rdistill.config.stages import (EvalConfig, GenerateConfig, MergeConfig, ServeConfig,
                                    ToyConfig, TrainConfig, VerifyConfig)
from rdistill.config.tracking import TrackingConfig

STAGES = ["toy", "generate", "verify", "train", "merge", "distill", "evaluate", "report", "serve"]


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Cluster to join (None: RAY_ADDRESS if set, else start a local cluster)."""
    num_cpus: Optional[int] = spec(None, gt=0)
    """Logical CPUs of a local cluster (None: max(8, cores)); ignored when joining a cluster.
    Data checkpointing and Serve need more logical CPUs than a laptop has cores."""
    include_dashboard: bool = False
    """Start the dashboard with a local cluster."""


@dataclass
class ExperimentConfig:
    name: str = "toy"
    """Run name: names the run directory and the served model."""
    run_dir: str = "runs/toy"
    """Where every stage writes its artifacts and manifest (shared storage on a multi-node cluster)."""
    stages: List[str] = spec(default_factory=lambda: ["toy", "generate", "verify", "train", "merge",
                                                      "evaluate", "report"], choices=STAGES)
    """Stages to run, in pipeline order."""
    force: List[str] = spec(default_factory=list, choices=STAGES)
    """Stages to rerun even when their manifest matches."""
    dry_run: bool = False
    """Validate the config and print the plan (stages, models, resources) without starting work."""
    verbose: bool = False
    """Print every library's and Ray worker's output on the console too (false: the console has
    rdistill's lines and real errors; the full stream is in <run_dir>/logs/)."""
    device: str = spec("cpu", choices=["cpu", "gpu"])
    """Where engines and training run; cpu uses CPU placement bundles and vLLM's CPU backend."""
    seed: int = 42
    """Global seed."""
    ray: RayConfig = field(default_factory=RayConfig)
    """How to reach Ray."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    """The toy world (used when a model or source says toy:...)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher that answers domain prompts."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student base every branch starts from."""
    domains: Dict[str, DomainConfig] = field(default_factory=dict)
    """The branches: one SFT set and one student per domain."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    """On-policy distillation of the merged student from each domain's teacher (the branches),
    run when `distill` is in stages (between merge and evaluate)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow, W&B or none): one parent run, a nested run per stage."""

    def validate(self, prefix: str) -> None:
        if not self.domains:
            fail("domains", {}, "configure at least one domain (e.g. domain@domains.math=toy_math)")
        order = [s for s in STAGES if s in self.stages]
        if order != list(self.stages):
            fail("stages", list(self.stages), "list each stage once, in pipeline order: " + ", ".join(STAGES))
        for name, dom in self.domains.items():
            bad = set(dom.train_overrides) - set(TrainConfig.__dataclass_fields__)
            if bad:
                fail(f"domains.{name}.train_overrides", sorted(bad),
                     "allowed keys are train's: " + ", ".join(TrainConfig.__dataclass_fields__))
            try:
                check(branch_train_config(self, name), f"domains.{name}.train_overrides.")
            except TypeError as e:
                raise ConfigError(f"domains.{name}.train_overrides: {e}") from None
        if self.distill.teachers:
            missing = sorted(set(self.domains) - set(self.distill.teachers))
            if missing:
                fail(f"distill.teachers.{missing[0]}", None, "every domain needs a teacher: add "
                     f"distill.teachers.{missing[0]}=branch:{missing[0]} (or leave distill.teachers empty "
                     "for the branches)")
            extra = sorted(set(self.distill.teachers) - set(self.domains))
            if extra:
                fail(f"distill.teachers.{extra[0]}", self.distill.teachers[extra[0]],
                     "no such domain: " + ", ".join(sorted(self.domains)))
        if self.teacher.backend == "openai" and not self.teacher.base_url:
            fail("teacher.base_url", None, "the openai backend needs the endpoint URL")


def branch_train_config(cfg: ExperimentConfig, domain: str) -> TrainConfig:
    """The train section with one domain's overrides applied."""
    import dataclasses
    return dataclasses.replace(cfg.train, **cfg.domains[domain].train_overrides)


def validated(cfg: Any) -> ExperimentConfig:
    """An `ExperimentConfig` from a dataclass, dict or OmegaConf tree, checked; raises ConfigError."""
    if not isinstance(cfg, ExperimentConfig):
        from omegaconf import OmegaConf
        if isinstance(cfg, dict):
            cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), cfg)
        cfg = OmegaConf.to_object(cfg)
    check(cfg)
    return cfg


def to_dict(obj: Any) -> Any:
    """A plain JSON-able dict of a config (for hashing and manifests)."""
    import dataclasses
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
