"""Existing teacher traces: which domains import them, and each record's traces as completions.

TinyR1 did not regenerate its SFT data: its math and code sets are public DeepSeek-R1 traces
(OpenR1-Math-220k's `generations` with `correctness_math_verify`, OpenThoughts-114k's
`deepseek_reasoning` + `deepseek_solution`). A source's `traces` names the columns; the generate
stage then writes one row per trace in the live teacher's format, `<think>\\nreasoning\\n</think>
\\n\\nanswer`, with token counts and a finish reason, so verify and everything after run unchanged.

Which domains import: teacher.backend=dataset imports every domain (each must declare traces);
a live teacher imports the domains whose sources declare traces when teacher.import_traces=true
and generates the others; otherwise every domain is generated.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from rdistill.config import ConfigError, ExperimentConfig
from rdistill.config.models import DomainConfig, TracesConfig
from rdistill.scoring.extract import THINK_CLOSE, THINK_OPEN, format_problem

FINISH = {"stop": "stop", "eos": "stop", "end_turn": "stop", "length": "length", "max_tokens": "length"}


def has_traces(d: DomainConfig) -> bool:
    return any(s.traces is not None for s in [d.train, *d.extra_train])


def imported_domains(cfg: ExperimentConfig) -> dict[str, bool]:
    """{domain: True when its traces are imported, False when the teacher generates it}."""
    t = cfg.teacher
    return {n: t.backend == "dataset" or (t.import_traces and has_traces(d)) for n, d in cfg.domains.items()}


def check_teacher_sources(cfg: ExperimentConfig) -> None:
    """teacher=dataset needs traces on every source of every domain (nothing could generate the
    rest); a live teacher importing a domain needs them on all of that domain's sources."""
    imports = imported_domains(cfg)
    for name, d in sorted(cfg.domains.items()):
        if not imports[name]:
            continue
        for key, src in [("train", d.train), *((f"extra_train[{i}]", s) for i, s in enumerate(d.extra_train))]:
            if src.traces is None:
                how = ("pick a live teacher for it (teacher=deepseek_r1_api teacher.import_traces=true "
                       "imports the domains with traces and generates the others)"
                       if cfg.teacher.backend == "dataset" else "or set teacher.import_traces=false")
                raise ConfigError(f"domains.{name}.{key} declares no traces but domain {name} is imported "
                                  f"(teacher.backend={cfg.teacher.backend}): set domains.{name}.{key}.traces, "
                                  f"or {how}")


def trace_columns(t: TracesConfig) -> list[str]:
    return [c for c in (t.reasoning, t.answer, t.generations, t.correct, t.complete, t.finish_reasons) if c]


def _text(v: Any) -> Optional[str]:
    """A text column's value; a list of texts (s1K's trajectories) is joined."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        parts = [x for x in v if isinstance(x, str)]
        return "\n\n".join(parts) if parts else None
    return str(v)


def _listed(v: Any, n: int) -> list:
    """A per-generation column as a list of n values (a scalar applies to every generation)."""
    if isinstance(v, (list, tuple)):
        return list(v) + [None] * (n - len(v))
    return [v] * n


def r1_completion(text: str) -> str:
    """A whole completion in R1's format: R1's chat template opens the <think> block itself, so
    saved outputs often start inside it; the opening tag is put back."""
    t = text.strip()
    if THINK_CLOSE in t and not t.startswith(THINK_OPEN):
        t = f"{THINK_OPEN}\n{t}"
    return t


def joined(reasoning: str, answer: str) -> str:
    r = reasoning.strip()
    r = r[len(THINK_OPEN):] if r.startswith(THINK_OPEN) else r
    r = r[:-len(THINK_CLOSE)] if r.endswith(THINK_CLOSE) else r
    return f"{THINK_OPEN}\n{r.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


def _finish(reason: Any, complete: Any, text: str) -> str:
    if complete is False:
        return "length"
    if isinstance(reason, str) and reason.lower() in FINISH:
        return FINISH[reason.lower()]
    if reason is not None:
        return "error"
    # Unknown: a closed reasoning block followed by an answer is a finished trace.
    bad = format_problem(text)
    return "length" if bad in ("needs exactly one <think> and one </think>", "no final answer after </think>") else "stop"


def traces_of(rec: dict, t: TracesConfig) -> tuple[list[dict], int]:
    """([{sample_idx, completion, finish_reason, error}], traces skipped as flagged incorrect).
    `sample_idx` is the trace's position in the source, so ids stay stable across filters."""
    if t.generations is None:
        reasoning, answer = _text(rec.get(t.reasoning)), _text(rec.get(t.answer))
        gens = [joined(reasoning, answer)] if reasoning and answer is not None else []
    else:
        g = rec.get(t.generations)
        gens = [g] if isinstance(g, str) else [x for x in (g or [])]
    n = len(gens)
    correct = _listed(rec.get(t.correct), n) if t.correct else [None] * n
    complete = _listed(rec.get(t.complete), n) if t.complete else [None] * n
    reasons = _listed(rec.get(t.finish_reasons), n) if t.finish_reasons else [None] * n
    out, skipped = [], 0
    for k, text in enumerate(gens):
        if not isinstance(text, str) or not text.strip():
            continue
        if correct[k] is False and not t.keep_incorrect:
            skipped += 1
            continue
        text = r1_completion(text)
        fr = _finish(reasons[k], complete[k], text)
        out.append({"sample_idx": k, "completion": text, "finish_reason": fr,
                    "error": f"imported finish_reason {reasons[k]!r}" if fr == "error" else None})
    return out, skipped


def token_counter(path: str, what: str) -> Callable[[list[str]], list[int]]:
    """Token counts of texts with the tokenizer at `path` (a model folder or HF id)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 (hub and file errors of many types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{what}={path}: cannot load its tokenizer to count imported tokens ({first}): "
                          "point teacher.tokenizer at a local model folder") from None

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return count
