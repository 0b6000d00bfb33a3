"""The generate stage: the teacher answers every domain's prompts, n samples each, or a
domain's existing traces are imported (teacher=dataset, or teacher.import_traces=true).

Generated domains: read (input blocks in ctx.work) -> `generate` (vLLM engine or HTTP endpoint)
-> write_parquet, under Ray Data's row-level checkpointing keyed by `row_key` (`<domain>/<id>`).
A run killed at any point and started again regenerates only rows whose block was not
committed; the written rows are then consolidated into `<out>/<domain>.parquet`, one row per
(prompt, sample), each exactly once. All generated domains go through one pipeline, so one
engine start serves them all.

Imported domains: each source's records stream through the same screening, and every trace
becomes one row of the same schema (`<prompt_id>#<k>`, k the trace's position in the source),
its tokens counted with `teacher.tokenizer` (default: the student's), written to
`<out>/<domain>.parquet` with no model running.
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
from rdistill.llm.batch import api_key, expand_samples, generate, sampling_json
from rdistill.prompts.sources import check_expected, iter_records, load_records, screen_records
from rdistill.prompts.traces import check_teacher_sources, imported_domains, token_counter
from rdistill.llm.spec import LLMSpec
from rdistill.log import log
from rdistill.rundir import stable_hash, write_json_atomic
from rdistill.topology import init_ray
from rdistill.stage_api import Stage


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


def _sources(d) -> list:
    return [("train", d.train), *((f"extra_train[{i}]", s) for i, s in enumerate(d.extra_train))]


def _tests_store(ctx) -> Path:
    return ctx.run.root / ".cache" / "tests"


def _rows(ctx, spec: LLMSpec, stats: dict, domains: list[str]) -> list[dict]:
    """Every (domain, prompt, sample) row the stage must produce, in a stable order."""
    cfg, g = ctx.cfg, ctx.cfg.generate
    count = _token_counter(spec)
    teacher, sampling = spec.name, sampling_json(g.sampling)
    rows: list[dict] = []
    for dom in sorted(domains):
        d = cfg.domains[dom]
        records = []
        for key, src in _sources(d):
            got = load_records(src, dom, ctx.source_path, key=f"domains.{dom}.{key}", tests_store=_tests_store(ctx))
            check_expected(src, len(got), f"domains.{dom}.{key}")
            records += got
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
                      "rows": len(dom_rows), "source": "generated"}
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
    return {"probe_prompts": len(out), "probe_with_think": check_probe_answers(out)}


def check_probe_answers(out: list[dict]) -> int:
    """How many probe answers close a </think> block; none of them stops the stage in one line."""
    ok = sum("</think>" in (o.get("completion") or "") for o in out)
    if out and ok == 0:
        first = out[0].get("error") or repr((out[0].get("completion") or "")[:200])
        raise GenerationError(f"generate: the teacher's answers to {len(out)} probe prompt(s) have no "
                              f"<think>...</think> reasoning (first: {first}); check teacher.model/base_url, "
                              "or set generate.probe_prompts=0 to skip this check")
    return ok


IMPORT_CHUNK = 512  # records per chunk: screened, token-counted and written together


def _import_domain(ctx, dom: str, count: Callable[[list[str]], list[int]], stats: dict) -> None:
    """One imported domain's traces as generate rows, streamed into `<out>/<dom>.parquet`."""
    cfg, d = ctx.cfg, ctx.cfg.domains[dom]
    s = stats[dom] = {"source": "imported", "records": 0, "bad_records": {}, "prompts": 0,
                      "records_without_traces": 0, "skipped_incorrect": 0, "rows": 0}
    bad_all: dict[str, int] = {}
    seen: set = set()
    with store.DomainWriter(ctx.out / f"{dom}.parquet") as out:
        for key, src in _sources(d):
            n_src, chunk = 0, []
            if src.expected_rows is not None:  # a cheap pass (no trace columns) before the work
                check_expected(src, sum(1 for _ in iter_records(src, dom, ctx.source_path, with_tests=False,
                                                                key=f"domains.{dom}.{key}")),
                               f"domains.{dom}.{key}")

            def flush() -> None:
                good, bad = screen_records(chunk, cfg.generate.on_bad_record, f"generate: domain {dom}",
                                           system_prompt=d.system_prompt, suffix=d.instruction_suffix, seen=seen)
                for k, v in bad.items():
                    bad_all[k] = bad_all.get(k, 0) + v
                rows = []
                for r in good:
                    s["skipped_incorrect"] += r.get("skipped_incorrect", 0)
                    s["records_without_traces"] += not r["traces"]
                    for t in r["traces"]:
                        rows.append({"id": f"{r['id']}#{t['sample_idx']}", "prompt_id": r["id"], "domain": dom,
                                     "messages": r["messages"], "prompt": r["user_prompt"], "teacher": cfg.teacher.name,
                                     "sampling": json.dumps({"imported": src.label()}), "gold": r["gold"],
                                     "tests": r["tests"], "entry_point": r["entry_point"], **t})
                s["prompts"] += len(good)
                ptoks = count([r["prompt"] for r in rows])
                ctoks = count([r["completion"] for r in rows])
                for r, p, c in zip(rows, ptoks, ctoks):
                    r.update(prompt_tokens=p, completion_tokens=c)
                out.write(rows)
                s["rows"] += len(rows)
                chunk.clear()

            for rec in iter_records(src, dom, ctx.source_path, key=f"domains.{dom}.{key}", with_traces=True,
                                    tests_store=_tests_store(ctx)):
                n_src += 1
                chunk.append(rec)
                if len(chunk) >= IMPORT_CHUNK:
                    flush()
            flush()
            s["records"] += n_src
    s["bad_records"] = bad_all
    s.update(store.domain_totals(ctx.out / f"{dom}.parquet"))
    log.info("generate: domain %s: imported %d traces of %d prompts (%d flagged incorrect skipped, %d "
             "prompts without traces)", dom, s["rows"], s["prompts"], s["skipped_incorrect"],
             s["records_without_traces"])
    if not s["rows"]:
        raise GenerationError(f"generate: domain {dom} imported no traces; check domains.{dom}.train.traces "
                              "(the columns holding the traces) and the bad-record counts logged above")


def _import(ctx, domains: list[str], stats: dict) -> dict:
    cfg = ctx.cfg
    ref = cfg.teacher.tokenizer or cfg.student.base
    count = token_counter(ctx.model(ref), "teacher.tokenizer" if cfg.teacher.tokenizer else "student.base")
    t0 = time.time()
    for dom in sorted(domains):
        _import_domain(ctx, dom, count, stats)
    return {"imported_domains": sorted(domains), "imported_rows": sum(stats[d]["rows"] for d in domains),
            "import_s": round(time.time() - t0, 2)}


def run(ctx) -> dict:
    cfg, g = ctx.cfg, ctx.cfg.generate
    check_teacher_sources(cfg)
    which = imported_domains(cfg)
    imported = [d for d, yes in which.items() if yes]
    live = [d for d, yes in which.items() if not yes]
    stats: dict[str, Any] = {}
    result: dict[str, Any] = {"backend": cfg.teacher.backend, "teacher": cfg.teacher.name}
    if imported:
        result.update(_import(ctx, imported, stats))
    if not live:
        return {**result, "domains": stats, "rows": sum(s["rows"] for s in stats.values()), "error_rows": 0,
                "error_share": 0.0, **store.summed(stats)}
    return _generate(ctx, live, stats, result)


def _generate(ctx, live: list[str], stats: dict, result: dict) -> dict:
    cfg, g = ctx.cfg, ctx.cfg.generate
    model = ctx.model(cfg.teacher.model) if cfg.teacher.backend == "vllm" else cfg.teacher.model
    spec = LLMSpec.from_teacher(cfg.teacher, model, g.sampling, cfg.device)
    if spec.backend == "openai":
        api_key(spec)  # fail before any work when the key is missing
    gen_stats: dict[str, Any] = {}
    rows = _rows(ctx, spec, gen_stats, live)
    # what the rows depend on: not how many requests are open at once (resuming with another
    # max_in_flight keeps the rows already written)
    what = {k: v for k, v in to_dict(spec).items() if k != "max_in_flight"}
    key = stable_hash([what, g.block_rows, [(r["row_key"], r["prompt"]) for r in rows]])
    _fresh_work(ctx.work, key)
    inputs, ckpt, out = ctx.work / "input", ctx.work / "ckpt", ctx.work / "out"
    store.write_inputs(rows, inputs, g.block_rows)
    done_before = store.committed_ids(ckpt)
    retried = store.forget_errors(out, ckpt)
    done_before -= retried
    init_ray(cfg.ray)
    if spec.backend == "openai" and g.probe_prompts and not done_before:
        result.update(_probe(spec, rows, g.probe_prompts))
    todo = len(rows) - len(done_before)
    log.info("generate: %d rows (%d prompts x %d samples), %d already written, %d to generate",
             len(rows), sum(s["prompts"] for s in gen_stats.values()), g.sampling.n, len(done_before), todo)
    t0 = time.time()
    if todo:
        store.run_checkpointed(inputs, out, ckpt, lambda ds: generate(ds, spec))
    gen_s = time.time() - t0
    table, dups = store.consolidate(out, [r["row_key"] for r in rows])
    new = ~table.column("row_key").to_pandas().isin(done_before).to_numpy()
    totals = store.write_domains(table, ctx.out, gen_stats)
    stats.update(gen_stats)
    new_tokens = int(table.column("completion_tokens").to_numpy()[new].sum())
    errors, n = totals["error_rows"], len(rows)
    result.update(domains=stats, rows=n + result.get("imported_rows", 0), resumed_rows=len(done_before),
                  generated_rows=int(new.sum()),
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


# The teacher answers the train prompts (or its traces are imported, counted with the student's
# tokenizer); evaluation-side domain settings are not read here.
STAGE = Stage("generate", run, reads=("teacher", "generate", "student"), engine="teacher.engine",
              domains_ignored=("dev", "test", "extra_test", "eval_samples", "require_correct",
                               "train_overrides", "language"))
