"""The generate stage: the teacher answers every domain's prompts, n samples each.

read (input blocks in ctx.work) -> `generate` (vLLM engine or HTTP endpoint) -> write_parquet,
under Ray Data's row-level checkpointing keyed by `row_key` (`<domain>/<id>`). A run killed at
any point and started again regenerates only rows whose block was not committed; the written
rows are then consolidated into `<out>/<domain>.parquet`, one row per (prompt, sample), each
exactly once. All domains go through one pipeline, so one engine start serves them all.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from rdistill.config import to_dict
from rdistill.errors import ResourceError
from rdistill.generate import store
from rdistill.generate.llm import api_key, expand_samples, generate, sampling_json
from rdistill.generate.sources import load_records, screen_records
from rdistill.generate.spec import LLMSpec
from rdistill.log import log
from rdistill.rundir import stable_hash, write_json_atomic
from rdistill.topology import init_ray


class GenerationError(ResourceError):
    """Too many rows failed after retries (more than generate.max_error_share)."""


def _token_counter(spec: LLMSpec) -> Optional[Callable[[list], int]]:
    """Counts a chat's prompt tokens with the teacher's own template (vllm backend: the model
    is local); an endpoint's tokenizer is unknown, so its over-long prompts come back as errors."""
    if spec.backend != "vllm":
        return None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(spec.model)

    def count(messages: list) -> int:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    return count


def _rows(ctx, spec: LLMSpec, stats: dict) -> list[dict]:
    """Every (domain, prompt, sample) row the stage must produce, in a stable order."""
    cfg, g = ctx.cfg, ctx.cfg.generate
    count = _token_counter(spec)
    teacher, sampling = spec.name, sampling_json(g.sampling)
    rows: list[dict] = []
    for dom in sorted(cfg.domains):
        d = cfg.domains[dom]
        records = []
        for src in [d.train, *d.extra_train]:
            records += load_records(src, dom, ctx.source_path)
        good, bad = screen_records(records, g.on_bad_record, f"generate: domain {dom}", count,
                                   spec.max_model_len, d.system_prompt, d.instruction_suffix)
        if bad:
            log.warning("generate: domain %s: skipped %d bad prompt record(s): %s", dom,
                        sum(bad.values()), dict(bad))
        base = [{"domain": dom, "messages": r["messages"], "prompt": r["user_prompt"], "id": r["id"],
                 "gold": r["gold"], "tests": r["tests"], "entry_point": r["entry_point"],
                 "teacher": teacher, "sampling": sampling} for r in good]
        dom_rows = expand_samples(base, g.sampling.n, g.sampling.seed)
        for r in dom_rows:
            r["row_key"] = f"{dom}/{r['id']}"
        rows += dom_rows
        stats[dom] = {"records": len(records), "bad_records": dict(bad), "prompts": len(good),
                      "rows": len(dom_rows)}
    if not rows:
        raise GenerationError("generate: no usable prompt records in any domain; check the sources "
                              "(domains.<name>.train) and the bad-record counts logged above")
    return rows


def _fresh_work(work: Path, key: str) -> None:
    """Keep resumable state only if it was made for exactly these rows and this teacher."""
    state = work / "state.json"
    if state.exists() and json.loads(state.read_text()).get("key") == key:
        return
    if state.exists():
        log.info("generate: config or prompts changed since the interrupted run; starting over")
    for p in work.iterdir() if work.exists() else []:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state, {"key": key})


def _probe(spec: LLMSpec, rows: list[dict], n: int) -> dict:
    """Ask the endpoint a few prompts first: a teacher that does not write <think>...</think>
    would have every sample dropped by the verifier, so stop before paying for all of them."""
    import ray
    sample = [{k: r[k] for k in ("row_key", "messages")} for r in rows if r["sample_idx"] == 0][:n]
    out = generate(ray.data.from_items(sample), spec).take_all()
    ok = sum("</think>" in (o["completion"] or "") for o in out)
    if ok == 0:
        first = out[0]["error"] or repr((out[0]["completion"] or "")[:200])
        raise GenerationError(f"generate: the teacher's answers to {len(out)} probe prompt(s) have no "
                              f"<think>...</think> reasoning (first: {first}); check teacher.model/base_url, "
                              "or set generate.probe_prompts=0 to skip this check")
    return {"probe_prompts": len(out), "probe_with_think": ok}


def run(ctx) -> dict:
    cfg, g = ctx.cfg, ctx.cfg.generate
    model = ctx.model(cfg.teacher.model) if cfg.teacher.backend == "vllm" else cfg.teacher.model
    spec = LLMSpec.from_teacher(cfg.teacher, model, g.sampling, cfg.device)
    if spec.backend == "openai":
        api_key(spec)  # fail before any work when the key is missing
    stats: dict[str, Any] = {}
    rows = _rows(ctx, spec, stats)
    key = stable_hash([to_dict(spec), g.block_rows, [(r["row_key"], r["prompt"]) for r in rows]])
    _fresh_work(ctx.work, key)
    inputs, ckpt, out = ctx.work / "input", ctx.work / "ckpt", ctx.work / "out"
    store.write_inputs(rows, inputs, g.block_rows)
    done_before = store.committed_ids(ckpt)
    retried = store.forget_errors(out, ckpt)
    done_before -= retried
    init_ray(cfg.ray)
    result: dict[str, Any] = {"backend": spec.backend, "teacher": spec.name}
    if spec.backend == "openai" and g.probe_prompts and not done_before:
        result.update(_probe(spec, rows, g.probe_prompts))
    todo = len(rows) - len(done_before)
    log.info("generate: %d rows (%d prompts x %d samples), %d already written, %d to generate",
             len(rows), sum(s["prompts"] for s in stats.values()), g.sampling.n, len(done_before), todo)
    t0 = time.time()
    if todo:
        store.run_checkpointed(inputs, out, ckpt, lambda ds: generate(ds, spec))
    gen_s = time.time() - t0
    table, dups = store.consolidate(out, [r["row_key"] for r in rows])
    new = ~table.column("row_key").to_pandas().isin(done_before).to_numpy()
    totals = store.write_domains(table, ctx.out, stats)
    new_tokens = int(table.column("completion_tokens").to_numpy()[new].sum())
    errors, n = totals["error_rows"], len(rows)
    result.update(domains=stats, rows=n, resumed_rows=len(done_before), generated_rows=int(new.sum()),
                  retried_error_rows=len(retried), duplicates_dropped=dups, **totals,
                  error_share=round(errors / n, 4), generation_s=round(gen_s, 2),
                  completion_tokens_per_s=round(new_tokens / gen_s, 1) if todo and gen_s > 0 else None)
    if errors / n > g.max_error_share:
        first = table.filter(table.column("finish_reason").to_pandas().eq("error").to_numpy())
        msg = first.column("error")[0].as_py()
        raise GenerationError(f"generate: {errors} of {n} rows ({errors / n:.1%}) failed after retries, above "
                              f"generate.max_error_share={g.max_error_share} (first error: {msg}); fix the "
                              "teacher and rerun (only the failed rows are sent again), or raise the share")
    return result
