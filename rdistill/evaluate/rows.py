"""Evaluation rows: each domain's dev/test prompts as chat rows, n samples per prompt.

Prompts are sent exactly as the generate stage sends them (the domain's system prompt, then the
prompt with the instruction suffix), so a model is scored on the format it was distilled on.
"""

from __future__ import annotations

from rdistill.config import DomainConfig, ExperimentConfig
from rdistill.config.fields import ConfigError
from rdistill.generate.llm import expand_samples
from rdistill.generate.sources import load_records, screen_records
from rdistill.log import log

# Record fields the verifiers read; kept on every row so scoring needs nothing else.
RECORD_FIELDS = ("gold", "tests", "entry_point")


def samples_per_prompt(cfg: ExperimentConfig, domain: str) -> int:
    return cfg.domains[domain].eval_samples or cfg.eval.sampling.n


def split_source(dom: DomainConfig, domain: str, split: str):
    src = getattr(dom, split)
    if src is None:
        raise ConfigError(f"domains.{domain}.{split} is not set: give the domain a {split} split "
                          f"(e.g. domains.{domain}.{split}.path=...)")
    return src


def prompt_records(cfg: ExperimentConfig, domain: str, split: str, resolve_path) -> list[dict]:
    """The split's usable prompt records with their chat `messages`, at most eval.max_prompts."""
    dom = cfg.domains[domain]
    recs = load_records(split_source(dom, domain, split), domain, resolve_path)
    good, bad = screen_records(recs, "skip", f"domains.{domain}.{split}",
                               system_prompt=dom.system_prompt, suffix=dom.instruction_suffix)
    if bad:
        log.warning("evaluate: domains.%s.%s: skipped %s", domain, split, dict(bad))
    if cfg.eval.max_prompts:
        good = good[: cfg.eval.max_prompts]
    if not good:
        raise ConfigError(f"domains.{domain}.{split} has no usable prompts: point it at a non-empty source")
    return good


def sample_rows(cfg: ExperimentConfig, domain: str, split: str, records: list[dict]) -> list[dict]:
    """One row per (prompt, sample): {id, prompt_id, sample_idx, domain, split, kind, language,
    prompt, messages, seed, gold, tests, entry_point}; ids are unique across domains and splits."""
    dom = cfg.domains[domain]
    base = []
    for r in records:
        pid = f"{domain}/{split}/{r['id']}"
        row = {"id": pid, "prompt_id": pid, "domain": domain, "split": split, "kind": dom.kind,
               "language": dom.language, "prompt": r["prompt"], "messages": r["messages"]}
        row.update({k: r.get(k) for k in RECORD_FIELDS})
        base.append(row)
    return expand_samples(base, samples_per_prompt(cfg, domain), cfg.eval.sampling.seed)

