"""What a stage is, on the ground floor: its context (`StageContext`) and its declaration (`Stage`).

Each stage module (`rdistill/<stage>/stage.py`) declares next to its `run` what it reads: the
config sections it uses, whether and which domain settings, and the stages whose outputs it
reads. The runner (rdistill/pipeline.py) derives the stage's cache key from that declaration:
whole sections are hashed (a new field in a section a stage reads is in its key at once), and
domain settings are hashed all but those the stage declares it ignores (a new domain field is in
the key of every stage that reads domains until a stage says it does not read it). So a setting
a stage reads cannot be missing from its key; at worst a stage reruns when it need not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from rdistill.config import DomainConfig, ExperimentConfig, to_dict
from rdistill.refs import resolve_model, resolve_source_path, toy_inputs
from rdistill.rundir import RunDir


@dataclass
class StageContext:
    cfg: ExperimentConfig
    run: RunDir
    out: Path
    """Temporary folder for this stage's artifacts (becomes <run_dir>/<stage>)."""
    work: Path
    """Resumable state that survives a kill; removed once the stage completes."""

    def model(self, ref: str) -> str:
        return resolve_model(ref, self.run, self.cfg.student.base)

    def source_path(self, path: str) -> str:
        return resolve_source_path(path, self.run)


Inputs = Union[Sequence[str], Callable[[ExperimentConfig], Sequence[str]]]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    reads: tuple[str, ...] = ()
    """ExperimentConfig fields the stage reads, hashed whole (sections or values)."""
    domains_ignored: Optional[tuple[str, ...]] = None
    """None: the stage reads no domain settings (their names only); else the DomainConfig fields
    it does not read: every other one, present or future, is in its key."""
    inputs: Inputs = ()
    """Stages whose outputs it reads; the toy stage is added wherever the config uses the toy
    world (toy:... models or sources)."""
    extra: Optional[Callable[[ExperimentConfig], dict]] = None
    """Settings read only in some configurations (the merge search reads evaluation's)."""
    cached: bool = True
    """False: always runs (serving is an action, not an artifact)."""
    engine: Optional[str] = None
    """Config section of the vLLM engines the stage starts (e.g. `teacher.engine`): an engine that
    refuses to start is reported in one line naming the setting of that section to change."""
    warm: bool = False
    """The stage scores students on warm engines (`rdistill.llm.warm.WarmPool.open`): the
    runner keeps such an engine running into the next stage that does too (one start for the
    merge search, distill and evaluate) and ends it before any other stage."""

    def input_stages(self, cfg: ExperimentConfig) -> list[str]:
        base = list(self.inputs(cfg) if callable(self.inputs) else self.inputs)
        return base + [s for s in toy_inputs(cfg) if s not in base and s != self.name]

    def config_slice(self, cfg: ExperimentConfig) -> dict:
        """What the stage's result depends on in the config: its cache key's content."""
        out: dict[str, Any] = {k: to_dict(getattr(cfg, k)) for k in self.reads}
        if self.domains_ignored is None:
            out["domains"] = sorted(cfg.domains)
        else:
            out["domains"] = {n: {f.name: to_dict(getattr(d, f.name)) for f in dataclasses.fields(d)
                                  if f.name not in self.domains_ignored}
                              for n, d in sorted(cfg.domains.items())}
        if self.extra is not None:
            out.update(self.extra(cfg))
        return out


def domain_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DomainConfig)]
