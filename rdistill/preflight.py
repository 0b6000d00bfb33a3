"""Preflight checks: cheap checks that fail in one clear line before teacher tokens are spent or
training starts, instead of hours later in a stage that finally trips over the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rdistill.config import ExperimentConfig
from rdistill.config.fields import ConfigError
from rdistill.refs import resolve_model
from rdistill.rundir import RunDir


class PreflightError(ConfigError):
    """A preflight check failed; the message says what and how to fix it."""


def disk_need(cfg: ExperimentConfig, to_run: list[str]) -> float:
    """Bytes of artifacts the stages about to run write (the dry run's estimate): generate and train
    write the bulk; the others' outputs are small next to them."""
    if "generate" not in to_run and "train" not in to_run:
        return 0.0
    from rdistill.estimates import disk_bytes
    return disk_bytes(cfg)


def check_run_dir(cfg: ExperimentConfig, need_bytes: float = 0.0) -> None:
    """The run directory and the other output folders (a local tracking store) can be created and
    written, and the run directory has room for the run's artifacts (rdistill.outputs)."""
    from rdistill.outputs import check_outputs
    check_outputs(cfg, need_bytes)


def check_student_tokenizer(path: str, train_chat_template: str | None = None) -> None:
    """The student's tokenizer has a chat template, and its generation config stops on the end-of-
    turn token the template closes each turn with (else a trained student never stops talking);
    the template SFT renders with (`train.chat_template` or the student's) keeps the reasoning."""
    from transformers import AutoTokenizer, GenerationConfig

    from rdistill.data.chat_template import apply_chat_template_override, drops_reasoning
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise PreflightError(f"cannot load the student tokenizer from {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not tok.chat_template:
        raise PreflightError(f"the student tokenizer at {path} has no chat template: "
                             "add one (tokenizer_config.json chat_template or chat_template.jinja)")
    if train_chat_template is not None or drops_reasoning(tok):
        try:
            sft_tok = apply_chat_template_override(AutoTokenizer.from_pretrained(path), train_chat_template)
        except ValueError as e:
            raise PreflightError(str(e)) from None
        if drops_reasoning(sft_tok):
            which = f"train.chat_template={train_chat_template}" if train_chat_template else \
                f"the chat template of the student at {path}"
            raise PreflightError(f"{which} drops the <think> reasoning from assistant turns (DeepSeek-R1-"
                                 "Distill's own does), so SFT would train on bare answers: set "
                                 "train.chat_template=r1_distill_keep_reasoning (or a .jinja path)")
    probe = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                    tokenize=False)
    after = probe[probe.rindex("y") + 1:]
    try:
        gen = GenerationConfig.from_pretrained(path)
        eos = gen.eos_token_id
    except OSError:
        eos = tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    eos_tokens = {tok.convert_ids_to_tokens(i) for i in eos_ids}
    if not eos_tokens or not any(t and t in after for t in eos_tokens):
        raise PreflightError(f"the student at {path} stops on {sorted(map(str, eos_tokens)) or 'nothing'} but its "
                             f"chat template ends a turn with {after.strip()!r}: set generation_config.json "
                             "eos_token_id to the end-of-turn token")


def _arch(path: str) -> tuple[str, int] | None:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return None
    c = json.loads(cfg.read_text())
    return (",".join(c.get("architectures") or [c.get("model_type", "?")]), c.get("vocab_size", -1))


def check_merge_inputs(cfg: ExperimentConfig, run: RunDir, base_path: str) -> None:
    """Models named in merge plans that exist before training (paths, HF models on disk) share the
    student base's architecture and vocabulary; branches inherit both from the base."""
    want = _arch(base_path)
    if want is None:
        return
    for cand in cfg.merge.candidates:
        for step in cand.steps:
            for ref in [step.base_model, *(m.model for m in step.models)]:
                if not ref or ref.startswith(("branch:", "merge:")) or ref in ("base", "merged"):
                    continue
                got = _arch(resolve_model(ref, run, cfg.student.base))
                if got is not None and got != want:
                    raise PreflightError(
                        f"merge candidate {cand.name} step {step.name}: {ref} is {got[0]} with vocab {got[1]}, "
                        f"but the student base is {want[0]} with vocab {want[1]}: merge models of one family")


def check_merge_data(cfg: ExperimentConfig) -> None:
    """RegMean's models have domain data before anything runs: a branch of a configured domain
    has its verified SFT set (made by the run); any other model names an existing file in its
    `data`."""
    for cand in cfg.merge.candidates:
        for step in cand.steps:
            if not step.merge_method.startswith("regmean"):
                continue
            for i, m in enumerate(step.models):
                kind, _, domain = m.model.partition(":")
                where = f"merge.candidates.{cand.name}.steps.{step.name}.models[{i}]"
                if m.data:
                    if not Path(m.data).expanduser().is_file():
                        raise PreflightError(f"{where}.data={m.data}: no such file (the chat SFT JSONL of "
                                             f"{m.model}'s domain)")
                elif kind != "branch" or domain not in cfg.domains:
                    raise PreflightError(f"{where}: {step.merge_method} needs domain data for model {m.model}: "
                                         "set its data to the chat SFT JSONL of its domain (a branch:<domain> of "
                                         "this run uses its verified SFT set)")


def check_model(ref: str, path: str, what: str) -> None:
    """A model reference names a model that exists: a local directory with a config.json, or a
    Hugging Face id whose config loads (from the cache or the hub)."""
    local = os.path.isabs(path) or ref.startswith((".", "/", "~", "toy:", "branch:", "merge:"))
    if local:
        if not (Path(path) / "config.json").exists():
            raise PreflightError(f"{what}={ref}: no model at {path} (no config.json there): point it at an "
                                 "HF model directory or a Hugging Face model id")
        return
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 (hub errors have many types; all mean the same here)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PreflightError(f"{what}={ref}: cannot load the model's config ({first}): check the name, "
                             "HF_TOKEN for gated models, or download it to a local folder") from None


def check_endpoint(base_url: str, key: str | None, what: str = "teacher.base_url") -> None:
    """An OpenAI-compatible endpoint answers at all (any HTTP status but an auth refusal)."""
    import requests
    url = base_url.rstrip("/") + "/models"
    try:
        r = requests.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=15)
    except requests.RequestException as e:
        why = type(e).__name__ + (": connection refused" if "refused" in str(e).lower() else "")
        raise PreflightError(f"{what}={base_url} is unreachable ({why}): start the endpoint or fix the URL") from None
    if r.status_code in (401, 403):
        raise PreflightError(f"{what}={base_url} refused the API key (HTTP {r.status_code}): check the "
                             "variable teacher.api_key_env names")


def check_data_sources(cfg: ExperimentConfig, run: RunDir, to_run: list[str]) -> None:
    """The teacher and the domains' traces agree (generate), and, when verify, evaluate or merge
    will run, every dev and test set loads with its expected size and no dev prompt equals or
    overlaps a test prompt (a dev set inside the test set picks merges on test). Toy files the
    run has not built yet are skipped."""
    from rdistill.prompts.traces import check_teacher_sources
    if "generate" in to_run:
        check_teacher_sources(cfg)
    if not {"verify", "evaluate", "merge"} & set(to_run):
        return
    from rdistill.prompts.evalsets import check_dev_test
    from rdistill.refs import producing_stage, resolve_source_path

    def not_built(src) -> bool:  # made by a stage of this run that has not run yet
        return bool(src.path) and producing_stage(src.path) is not None and (
            producing_stage(src.path) in to_run or not Path(resolve_source_path(src.path, run)).exists())
    check_dev_test(cfg, lambda p: resolve_source_path(p, run), skip=not_built)


def run_preflight(cfg: ExperimentConfig, run: RunDir, to_run: list[str]) -> None:
    """The checks that apply to the stages about to run; models and sources a stage of this run
    is about to make (refs.producing_stage) are checked by that stage, not here."""
    check_run_dir(cfg, disk_need(cfg, to_run))  # first: every run writes there before anything else
    from rdistill.tracking import check_tracking
    check_tracking(cfg)  # only with tracking.required=true: the server answers, the credentials work
    from rdistill.refs import producing_stage
    made_now = lambda ref: producing_stage(ref) in to_run  # noqa: E731
    if "generate" in to_run:
        t = cfg.teacher
        if t.backend == "vllm" and not made_now(t.model):
            check_model(t.model, resolve_model(t.model, run), "teacher.model")
        elif t.backend == "openai" and t.base_url:
            from rdistill.llm.batch import api_key
            from rdistill.llm.spec import LLMSpec
            check_endpoint(t.base_url, api_key(LLMSpec(model=t.model, backend="openai",
                                                       api_key_env=t.api_key_env)))
    check_data_sources(cfg, run, to_run)
    scores_code = any(d.kind == "code" and (d.require_correct or "evaluate" in to_run)
                      for d in cfg.domains.values())
    if scores_code and ("verify" in to_run or "evaluate" in to_run):
        # Before any teacher token is spent: a sandbox that cannot run programs marks every
        # code answer wrong.
        from rdistill.scoring.sandbox_check import check_sandbox
        check_sandbox(cfg.verify.sandbox, "preflight")
    if "merge" in to_run:
        check_merge_data(cfg)
    if "train" in to_run or "merge" in to_run:
        if made_now(cfg.student.base):
            return  # built by this very run
        base = resolve_model(cfg.student.base, run)
        if os.path.isdir(base) or producing_stage(cfg.student.base) is None:
            check_model(cfg.student.base, base, "student.base")
            check_student_tokenizer(base, cfg.train.chat_template)
            check_merge_inputs(cfg, run, base)
