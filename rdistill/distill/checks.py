"""What the distill stage checks before any work: every domain has a teacher, every teacher is a
local model a vLLM engine can prefill (prompt logprobs), and every teacher shares the student's
tokenizer (its logprobs are of the student's token ids). Each failure is one line naming the fix."""

from __future__ import annotations

from pathlib import Path

from rdistill.errors import ConfigError


def teacher_refs(cfg) -> dict[str, str]:
    """Each domain's teacher reference: distill.teachers, else branch:<domain>."""
    refs = dict(cfg.distill.teachers) or {d: f"branch:{d}" for d in cfg.domains}
    missing = sorted(set(cfg.domains) - set(refs))
    if missing:
        d = missing[0]
        raise ConfigError(f"distill: domain {d} has no teacher: add distill.teachers.{d}=branch:{d} (or any "
                          "model with the student's tokenizer)")
    return {d: refs[d] for d in sorted(cfg.domains)}


def _scorable(domain: str, ref: str, path: str, cfg) -> None:
    """A teacher is scored by prefilling the student's tokens on a vLLM engine this stage starts:
    an endpoint or a dataset of traces cannot return prompt logprobs."""
    if ref == "teacher" and cfg.teacher.backend != "vllm":
        raise ConfigError(f"distill.teachers.{domain}=teacher: the {cfg.teacher.backend} teacher cannot return "
                          "prompt logprobs of given tokens: use a local model with the student's tokenizer "
                          f"(default branch:{domain})")
    if ref.startswith(("http://", "https://")):
        raise ConfigError(f"distill.teachers.{domain}={ref}: an endpoint cannot return prompt logprobs of given "
                          f"tokens: use a local model directory (default branch:{domain})")
    kw = cfg.eval.engine.engine_kwargs
    if "max_logprobs" in kw and kw["max_logprobs"] is not None and 0 <= int(kw["max_logprobs"]) < 1:
        raise ConfigError(f"eval.engine.engine_kwargs.max_logprobs={kw['max_logprobs']}: the engine could not "
                          "return prompt logprobs; remove it or set it >= 1")


def _vocab(path: str) -> tuple:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    return (tuple(sorted(tok.get_vocab().items())), tok.eos_token_id, tok.pad_token_id)


def check_teachers(cfg, student: str, resolve) -> dict[str, str]:
    """Each domain's teacher path, checked; raises ConfigError (one line) before any work."""
    if not (Path(student) / "config.json").exists():
        raise ConfigError(f"distill.student={cfg.distill.student}: no model at {student}: run the merge stage "
                          "first (stages=[...,merge,distill,...]) or give a model path")
    refs = teacher_refs(cfg)
    # `teacher`: the run's teacher (a vllm one is a local model, or an HF id that is refused below)
    paths = {d: resolve(cfg.teacher.model if r == "teacher" else r) for d, r in refs.items()}
    for d, r in refs.items():
        _scorable(d, r, paths[d], cfg)
    for d, r in refs.items():
        if not (Path(paths[d]) / "config.json").exists():
            raise ConfigError(f"distill.teachers.{d}={r}: no model at {paths[d]}; the teacher must be a local "
                              "model a vLLM engine prefills (run the stage that builds it, or give a path)")
    mine = _vocab(student)
    seen: dict[str, bool] = {}
    for d, p in paths.items():
        if p not in seen:
            seen[p] = _vocab(p) == mine
        if not seen[p]:
            raise ConfigError(f"distill.teachers.{d}={refs[d]}: its tokenizer differs from the student's "
                              f"({student}), so it cannot score the student's tokens: use a teacher of the "
                              "student's family (default: the branch)")
    return paths
