"""Typed, validated configs (plain dataclasses; Hydra only composes them in jobs/ and conf/)."""

from rdistill.config.experiment import (STAGES, ExperimentConfig, RayConfig, branch_train_config,
                                        to_dict, validated)
from rdistill.config.distill import DistillConfig
from rdistill.config.fields import MERGE_METHODS, ConfigError
from rdistill.config.models import (DomainConfig, EngineConfig, SamplingConfig, SourceConfig, StudentConfig,
                                    TeacherConfig)
from rdistill.config.stages import (SEARCH_CANDIDATE, EvalConfig, GenerateConfig,
                                    MergeCandidateConfig, MergeConfig, MergeModelConfig,
                                    MergeSearchConfig, MergeStatsConfig, MergeStepConfig, SandboxConfig, ServeConfig,
                                    ToyConfig, TrainConfig, VerifyConfig)
from rdistill.config.tracking import TRACKING_BACKENDS, TrackingConfig

__all__ = [
    "STAGES", "ExperimentConfig", "RayConfig", "branch_train_config", "to_dict", "validated",
    "ConfigError", "DistillConfig", "DomainConfig", "EngineConfig", "SamplingConfig", "SourceConfig", "StudentConfig", "TeacherConfig",
    "MERGE_METHODS", "SEARCH_CANDIDATE", "EvalConfig", "GenerateConfig", "MergeCandidateConfig",
    "MergeConfig", "MergeSearchConfig", "MergeStatsConfig", "MergeModelConfig", "MergeStepConfig", "SandboxConfig", "ServeConfig", "ToyConfig", "TrainConfig",
    "VerifyConfig", "TRACKING_BACKENDS", "TrackingConfig",
]
