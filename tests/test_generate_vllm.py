"""The generate stage through a real vLLM engine hosted by Ray Data, on a tiny random teacher:
rows, columns, counts, token accounting and bad-record skipping (one engine start for both domains)."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from gen_helpers import config, write_prompts
from rdistill.generate.store import OUTPUT_SCHEMA
from rdistill.pipeline import run_stage
from rdistill.rundir import RunDir
from rdistill.toy.model import tiny_test_model


@pytest.mark.slow
def test_vllm_generation_rows_columns_counts(tmp_path, ray_cluster):
    model = tiny_test_model(tmp_path / "teacher")
    too_long = {"id": "long", "prompt": "1 2 3 4 5 6 7 8 9 " * 40}
    math = write_prompts(tmp_path / "src" / "math.jsonl", 12, extra=[too_long])
    code = write_prompts(tmp_path / "src" / "code.jsonl", 5, domain="code")
    max_tokens = 24
    cfg = config(tmp_path / "run", {"math": math, "code": code},
                 {"backend": "vllm", "name": "tiny", "model": str(model), "engine": {"max_model_len": 256}, "batch_size": 8},
                 sampling={"n": 2, "max_tokens": max_tokens})
    m = run_stage(cfg, RunDir(cfg.run_dir), "generate")["result"]

    assert m["rows"] == 34 and m["generated_rows"] == 34 and m["resumed_rows"] == 0 and m["error_rows"] == 0
    assert m["domains"]["math"]["bad_records"] == {"prompt longer than the context": 1}
    assert m["domains"]["math"]["prompts"] == 12 and m["domains"]["code"]["rows"] == 10

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    for dom, n in (("math", 12), ("code", 5)):
        t = pq.read_table(tmp_path / "run" / "generate" / f"{dom}.parquet")
        assert t.schema.names == OUTPUT_SCHEMA.names
        rows = t.to_pylist()
        assert Counter((r["prompt_id"], r["sample_idx"]) for r in rows) == {
            (f"{dom}-{i}", s): 1 for i in range(n) for s in range(2)}
        for r in rows:
            assert r["id"] == f"{r['prompt_id']}#{r['sample_idx']}" and r["domain"] == dom and r["teacher"] == "tiny"
            assert r["prompt"].endswith("?\nBox it.") and r["messages"] == [{"role": "user", "content": r["prompt"]}]
            assert r["error"] is None and r["finish_reason"] in ("stop", "length")
            assert 0 < r["completion_tokens"] <= max_tokens
            assert (r["finish_reason"] == "length") == (r["completion_tokens"] == max_tokens)
            # the engine saw exactly the chat-templated prompt the stage screened
            text = tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
            assert r["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
        assert m["domains"][dom]["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
        # per-sample seeds: the two samples of a prompt are different draws
        by_prompt = {}
        for r in rows:
            by_prompt.setdefault(r["prompt_id"], []).append(r["completion"])
        assert sum(a != b for a, b in by_prompt.values()) >= n // 2
    print(f"\nvLLM generation: {m['completion_tokens']} completion tokens in {m['generation_s']} s "
          f"({m['completion_tokens_per_s']} tokens/s incl. engine start)")
