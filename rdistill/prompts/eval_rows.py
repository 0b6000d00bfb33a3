"""Evaluation rows: each domain's dev/test prompts as chat rows, n samples per prompt.

Prompts are sent exactly as the generate stage sends them (the domain's system prompt, then the
prompt with the instruction suffix), so a model is scored on the format it was distilled on.
A domain may have several test sets (`test` plus named `extra_test` sets such as AIME 2025 and
MATH-500): `domain_test_sets` lists them as (name, source), and rows of an extra set carry its name
(`math/aime25`) as their `domain`, so every aggregation by domain reports it as its own column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rdistill.config import DomainConfig, ExperimentConfig, SourceConfig
from rdistill.config.fields import ConfigError
from rdistill.llm.batch import expand_samples
from rdistill.log import log
from rdistill.prompts.evalsets import domain_test_sets, split_records  # noqa: F401  (re-exported)
from rdistill.prompts.sources import screen_records

# Record fields the verifiers read; kept on every row so scoring needs nothing else.
RECORD_FIELDS = ("gold", "tests", "entry_point")


def samples_per_prompt(cfg: ExperimentConfig, domain: str, source: Optional[SourceConfig] = None) -> int:
    """Samples per prompt: the evaluated source's eval_samples, else the domain's, else eval.sampling.n."""
    return (source.eval_samples if source is not None else None) or cfg.domains[domain].eval_samples \
        or cfg.eval.sampling.n


def split_source(dom: DomainConfig, domain: str, split: str):
    src = getattr(dom, split)
    if src is None:
        raise ConfigError(f"domains.{domain}.{split} is not set: give the domain a {split} split "
                          f"(e.g. domains.{domain}.{split}.path=...)")
    return src


def tests_store(cfg: ExperimentConfig) -> Path:
    """Where packed test files (LiveCodeBench's private tests) live: under the run directory, so
    every node of a cluster reads them from the run's shared storage."""
    return Path(cfg.run_dir).absolute() / ".cache" / "tests"


def prompt_records(cfg: ExperimentConfig, domain: str, split: str, resolve_path,
                   source: Optional[SourceConfig] = None) -> list[dict]:
    """The split's usable prompt records with their chat `messages`, at most eval.max_prompts.
    `source`: one of the domain's test sets (from `domain_test_sets`; default the split's own source).
    Dev sets with `exclude_test` lose the records of the domain's test sets."""
    dom = cfg.domains[domain]
    src = source or split_source(dom, domain, split)
    recs = split_records(cfg, domain, split, resolve_path, source=src, tests_store=tests_store(cfg))
    label = f"domains.{domain}.{split}" + (f" ({src.name})" if src.name else "")
    good, bad = screen_records(recs, "skip", label, system_prompt=dom.system_prompt, suffix=dom.instruction_suffix)
    if bad:
        log.warning("evaluate: %s: skipped %s", label, dict(bad))
    if cfg.eval.max_prompts:
        good = good[: cfg.eval.max_prompts]
    if not good:
        raise ConfigError(f"{label} has no usable prompts: point it at a non-empty source")
    return good


def sample_rows(cfg: ExperimentConfig, domain: str, split: str, records: list[dict],
                n: Optional[int] = None, name: Optional[str] = None) -> list[dict]:
    """One row per (prompt, sample): {id, prompt_id, sample_idx, domain, split, kind, language,
    prompt, messages, seed, gold, tests, entry_point}; ids are unique across domains and splits.
    `n` samples per prompt (None: the domain's eval_samples, else eval.sampling.n). `name`: the
    test set's name from `domain_test_sets` (e.g. `math/aime25`), written as the rows' `domain` (the
    branch domain, whose verifier scores them, stays in `branch_domain`)."""
    dom = cfg.domains[domain]
    label = name or domain
    base = []
    for r in records:
        pid = f"{label}/{split}/{r['id']}"
        row = {"id": pid, "prompt_id": pid, "domain": label, "branch_domain": domain, "split": split,
               "kind": dom.kind, "language": dom.language, "prompt": r["prompt"], "messages": r["messages"]}
        row.update({k: r.get(k) for k in RECORD_FIELDS})
        base.append(row)
    return expand_samples(base, n or samples_per_prompt(cfg, domain), cfg.eval.sampling.seed)
