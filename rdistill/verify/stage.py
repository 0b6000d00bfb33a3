"""The verify stage: generated teacher samples -> one verified SFT set per domain, with a funnel.

Every domain's `<run_dir>/generate/<domain>.parquet` is read with Ray Data and checked in
parallel Ray tasks, all domains in one execution (rows.check_frame: complete, formatted, within
budget, decontaminated against every domain's dev/test prompts, correct by the domain's
verifier). The checked rows are materialized once; the driver takes only their small columns
(ids, keys, signatures) to remove exact and near-duplicates per domain and apply
`verify.max_samples_per_prompt`, then streams the rows once into the outputs. Written:

    <out>/<domain>.jsonl           {id, prompt_id, domain, messages (+ assistant answer), completion_tokens}
    <out>/dropped/<domain>.parquet every dropped row with its reason and detail
    manifest result                {"funnel": {domain: {step: rows}}, "dropped": {...}, rates}
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rdistill.config import ConfigError, ExperimentConfig
from rdistill.log import log
from rdistill.stage_api import Stage, StageContext
from rdistill.verify.dedup import ContaminationIndex, find_duplicates
from rdistill.verify.rows import FUNNEL, INFRA, NEAR_DUPLICATE, check_frame
from rdistill.scoring.sandbox_check import SandboxUnavailable, check_sandbox

ROWS_PER_BLOCK = 32  # a block is one Ray task; small blocks spread sandbox runs over the CPUs
DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("domain", pa.string()),
                            ("reason", pa.string()), ("detail", pa.string()), ("finish_reason", pa.string()),
                            ("completion_tokens", pa.int64()), ("extracted", pa.string()),
                            ("prompt", pa.string()), ("completion", pa.string())])


def eval_prompts(ctx: StageContext) -> list[str]:
    """The dev and test prompts of every domain, extra test sets (AIME 2025, MATH-500) included:
    what the SFT sets must not overlap. Prompts only: a test set's tests are not read."""
    from rdistill.prompts.sources import load_records
    from rdistill.prompts.evalsets import domain_test_sets
    texts: list[str] = []
    for name, dom in sorted(ctx.cfg.domains.items()):
        sources = ([dom.dev] if dom.dev is not None else []) + [s for _, s in domain_test_sets(dom, name)]
        for src in sources:
            texts += [r["prompt"] for r in load_records(src, name, ctx.source_path, with_tests=False)
                      if isinstance(r.get("prompt"), str)]
    return texts


def funnel_counts(reasons: Counter, generated: int) -> dict[str, int]:
    """Rows left after each funnel step, from the count of rows dropped at each."""
    out, left = {}, generated
    for step, reason in FUNNEL:
        if reason is not None:
            left -= reasons.get(reason, 0) + (reasons.get(NEAR_DUPLICATE, 0) if reason == "duplicate" else 0)
        out[step] = left
    return out


def _checked_dataset(ctx: StageContext, index: ContaminationIndex) -> tuple[Any, dict[str, int]]:
    """All domains' rows, checked in parallel Ray tasks, as one lazy dataset (one execution for
    the whole stage), and the rows generated per domain."""
    import ray
    from rdistill.topology import verify_task_options
    cfg: ExperimentConfig = ctx.cfg
    parts, counts = [], {}
    for domain in sorted(cfg.domains):
        dom = cfg.domains[domain]
        if dom.kind == "code" and dom.language != "python":
            raise ConfigError(f"domains.{domain}.language={dom.language!r} is invalid: the code sandbox "
                              "runs python programs only")
        src = ctx.run.stage_dir("generate") / f"{domain}.parquet"
        if not src.exists():
            raise ConfigError(f"verify: {src} does not exist: run the generate stage first "
                              "(stages=[generate,verify])")
        # One generate file is one row group, which Ray Data would read as one block (one task):
        # split it on the driver so that blocks spread over the CPUs.
        table = pq.read_table(src, memory_map=True)
        n = counts[domain] = table.num_rows
        if not n:
            continue
        # take() copies: a pickled slice would carry the whole file's buffers into every block
        blocks = [table.take(list(range(i, min(i + ROWS_PER_BLOCK, n)))) for i in range(0, n, ROWS_PER_BLOCK)]
        parts.append(ray.data.from_arrow(blocks).map_batches(
            check_frame, batch_format="pandas", batch_size=None,
            fn_kwargs=dict(domain=domain, kind=dom.kind, language=dom.language, index=index,
                           max_tokens=cfg.verify.max_completion_tokens, sandbox=cfg.verify.sandbox,
                           require_correct=dom.require_correct),
            **verify_task_options()))
    if not parts:
        return None, counts
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), counts


def dataset_drops(meta: Any, cfg: ExperimentConfig) -> dict[str, tuple[str, str]]:
    """{id: (reason, detail)} of rows that passed the per-row checks but are duplicates (per
    domain, exact or near) or beyond `max_samples_per_prompt`."""
    drop: dict[str, tuple[str, str]] = {}
    cap = cfg.verify.max_samples_per_prompt
    for _, alive in meta[meta["drop_reason"].isna()].groupby("domain"):
        dups = find_duplicates(list(alive["id"]), list(alive["dup_key"]), list(alive["minhash"]),
                               cfg.verify.near_dup_threshold)
        drop.update({rid: (why, f"same as {twin}") for rid, (why, twin) in dups.items()})
        if cap:
            left = alive[~alive["id"].isin(list(dups))].sort_values(["prompt_id", "sample_idx", "id"])
            rank = left.groupby("prompt_id").cumcount()
            for rid in left["id"][rank >= cap]:
                drop[rid] = ("over_sample_cap", f"more than {cap} verified samples of this prompt")
    return drop


def check_infra(funnel: dict[str, dict[str, int]], reasons: dict[str, Counter]) -> None:
    """Rows the verifier could not judge (sandbox or machine failures) are never silent: all of a
    domain's checked rows failing that way stops the stage, some of them are logged loudly."""
    for d, f in funnel.items():
        n = reasons[d].get(INFRA, 0)
        if not n:
            continue
        if n == f["decontaminated"]:
            raise SandboxUnavailable(f"verify: all {n} samples of domain {d} failed in the code sandbox, not "
                                     f"on their merits (see verify/dropped/{d}.parquet, reason "
                                     f"{INFRA}): run `python -m rdistill.scoring.sandbox PROGRAM.py` to see why")
        log.warning("verify %s: %d of %d samples could not be judged (sandbox or busy machine: reason %s); "
                    "they are left out, not counted as wrong", d, n, f["decontaminated"], INFRA)


def run(ctx: StageContext) -> dict:
    from rdistill.topology import init_ray
    if any(d.kind == "code" and d.require_correct for d in ctx.cfg.domains.values()):
        check_sandbox(ctx.cfg.verify.sandbox, "verify")
    init_ray(ctx.cfg.ray)
    t0 = time.time()
    index = ContaminationIndex(eval_prompts(ctx), ctx.cfg.verify.decontam_ngram)
    log.info("verify: %d evaluation n-grams to decontaminate against", len(index))
    ds, generated = _checked_dataset(ctx, index)
    reasons: dict[str, Counter] = {d: Counter() for d in generated}
    (ctx.out / "dropped").mkdir(parents=True, exist_ok=True)
    sft = {d: (ctx.out / f"{d}.jsonl").open("w", encoding="utf-8") for d in generated}
    dropped = {d: pq.ParquetWriter(ctx.out / "dropped" / f"{d}.parquet", DROPPED_SCHEMA) for d in generated}
    from ray.data import DataContext
    opts = DataContext.get_current().execution_options
    keep_order, opts.preserve_order = opts.preserve_order, True  # same SFT file order on every run
    try:
        if ds is not None:
            ds = ds.materialize()
            meta = ds.select_columns(["id", "prompt_id", "sample_idx", "domain", "drop_reason", "dup_key",
                                      "minhash"]).to_pandas()
            _write(ds, dataset_drops(meta, ctx.cfg), sft, dropped, reasons)
    finally:
        opts.preserve_order = keep_order
        for f in sft.values():
            f.close()
        for w in dropped.values():
            w.close()
    wall = time.time() - t0
    funnel = {d: funnel_counts(reasons[d], n) for d, n in generated.items()}
    for d, f in funnel.items():
        log.info("verify %s: %s", d, " -> ".join(f"{k} {v}" for k, v in f.items()))
    check_infra(funnel, reasons)
    rows = sum(generated.values())
    # Pairs, not a mapping: manifests are written with sorted keys, and a funnel is read in order.
    return {"funnel": {d: [[step, n] for step, n in f.items()] for d, f in funnel.items()}, "dropped": {d: dict(sorted(c.items())) for d, c in reasons.items()},
            "rows": rows, "kept": sum(f["kept"] for f in funnel.values()),
            "kept_per_domain": {d: f["kept"] for d, f in funnel.items()},
            "wall_s": round(wall, 2), "rows_per_s": round(rows / max(wall, 1e-9), 2)}


def _write(ds: Any, drop: dict, sft: dict, dropped: dict, reasons: dict) -> None:
    """Stream the checked rows once: kept rows to the SFT sets, the rest with their reasons."""
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=512):
        gone: dict[str, list] = {}
        for r in batch.to_pylist():
            d, reason, detail = r["domain"], r["drop_reason"], r["drop_detail"]
            if reason is None and r["id"] in drop:
                reason, detail = drop[r["id"]]
            if reason is not None:
                reasons[d][reason] += 1
                gone.setdefault(d, []).append({k: r.get(k) for k in DROPPED_SCHEMA.names if k in r}
                                              | {"reason": reason, "detail": detail})
                continue
            msgs = json.loads(r["messages_json"]) + [{"role": "assistant", "content": r["completion"]}]
            sft[d].write(json.dumps({"id": r["id"], "prompt_id": r["prompt_id"], "domain": d, "messages": msgs,
                                     "completion_tokens": r["completion_tokens"]}, ensure_ascii=False) + "\n")
        for d, rows in gone.items():
            dropped[d].write_table(pa.Table.from_pylist(rows, schema=DROPPED_SCHEMA))


# Checks the generated rows; reads dev/test prompts (decontamination), the verifier settings.
STAGE = Stage("verify", run, reads=("verify",), inputs=("generate",),
              domains_ignored=("train", "extra_train", "system_prompt", "instruction_suffix",
                               "eval_samples", "train_overrides"))
