"""Typed, validated configs (plain dataclasses; Hydra only composes them in jobs/ and conf/)."""

from rdistill.config.experiment import (STAGES, ExperimentConfig, RayConfig, branch_train_config,
                                        to_dict, validated)
from rdistill.config.fields import ConfigError
from rdistill.config.models import (DomainConfig, SamplingConfig, SourceConfig, StudentConfig,
                                    TeacherConfig)
from rdistill.config.stages import (MERGE_METHODS, EvalConfig, GenerateConfig, MergeCandidateConfig,
                                    MergeConfig, MergeModelConfig, MergeStepConfig, SandboxConfig,
                                    ServeConfig, ToyConfig, TrainConfig, VerifyConfig)

__all__ = [
    "STAGES", "ExperimentConfig", "RayConfig", "branch_train_config", "to_dict", "validated",
    "ConfigError", "DomainConfig", "SamplingConfig", "SourceConfig", "StudentConfig", "TeacherConfig",
    "MERGE_METHODS", "EvalConfig", "GenerateConfig", "MergeCandidateConfig", "MergeConfig",
    "MergeModelConfig", "MergeStepConfig", "SandboxConfig", "ServeConfig", "ToyConfig", "TrainConfig",
    "VerifyConfig",
]
