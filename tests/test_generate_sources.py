"""Prompt sources, bad-record screening, sample expansion and completion parsing (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen_helpers import write_prompts
from rdistill.config import SourceConfig
from rdistill.llm.http import parse_completion
from rdistill.llm.batch import expand_samples, sample_seed
from rdistill.prompts.sources import BadRecordError, load_records, screen_records

BAD = [{"id": "no-prompt"}, {"id": "blank", "prompt": "   "}, {"prompt": "no id here", "id": None},
       {"id": "math-1", "prompt": "duplicate id"}, "{not json", {"id": "long", "prompt": "x " * 300}]


def test_jsonl_records_are_screened_with_counts(tmp_path):
    p = write_prompts(tmp_path / "m.jsonl", 4, extra=BAD)
    recs = load_records(SourceConfig(path=str(p)), "math")
    assert len(recs) == 10 and recs[0] == {"id": "math-0", "domain": "math", "prompt": "What is 0 + 0?",
                                           "gold": "0", "tests": None, "entry_point": None, "where": "line 1"}
    good, bad = screen_records(recs, "skip", "math", count_tokens=lambda m: len(m[-1]["content"].split()),
                               max_model_len=100, system_prompt="Be brief.", suffix="\nBox it.")
    assert [r["id"] for r in good] == ["math-0", "math-1", "math-2", "math-3"]
    assert good[1]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "What is 1 + 1?\nBox it."}]
    assert good[1]["user_prompt"] == "What is 1 + 1?\nBox it."
    assert dict(bad) == {"missing prompt": 1, "empty prompt": 1, "missing id": 1, "duplicate id": 1,
                         "malformed JSON": 1, "prompt longer than the context": 1}


@pytest.mark.parametrize("extra,why", [
    ({"id": "blank", "prompt": ""}, r"line 3 \(id='blank'\): empty prompt"),
    ("{oops", r"line 3 \(id=None\): malformed JSON on line 3"),
    ({"id": "long", "prompt": "a b c d e f g"},
     r"line 3 \(id='long'\): prompt longer than the context \(8 >= 7 tokens\)"),
])
def test_fail_fast_names_the_record_and_the_fix(tmp_path, extra, why):
    p = write_prompts(tmp_path / "m.jsonl", 2, extra=[extra])
    recs = load_records(SourceConfig(path=str(p)), "math")
    with pytest.raises(BadRecordError, match=why + ".*set generate.on_bad_record=skip"):
        screen_records(recs, "fail", "generate: domain math", lambda m: len(m[-1]["content"].split()) + 1, 7)


def test_parquet_field_mapping_filter_limit_and_choices(tmp_path):
    rows = [{"qid": i, "question": f"Q{i}?", "right": f"yes{i}", "wrong": f"no{i}", "topic": t,
             "tests": [{"in": i}]} for i, t in enumerate(["sci", "math", "sci", "sci"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    src = SourceConfig(path=str(tmp_path / "s.parquet"), fields={"id": "qid", "prompt": "question"},
                       filter={"topic": "sci"}, limit=2, choices=["right", "wrong"])
    recs = load_records(src, "science")
    assert [r["id"] for r in recs] == ["0", "2"]
    for r, i in zip(recs, [0, 2]):
        lines = r["prompt"].split("\n")
        assert lines[0] == f"Q{i}?" and lines[1] == "" and [x[:3] for x in lines[2:]] == ["A) ", "B) "]
        assert {x[3:] for x in lines[2:]} == {f"yes{i}", f"no{i}"}
        assert f"{r['gold']}) yes{i}" in lines  # the gold letter points at the correct option
        assert json.loads(r["tests"]) == [{"in": i}]
    # the shuffle is seeded by the record id: the same on every load
    assert load_records(src, "science") == recs


def test_hugging_face_source_from_a_local_dataset(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"problem": f"P{i}", "answer": i}) for i in range(3)))
    recs = load_records(SourceConfig(hf_name=str(d), split="train", fields={"prompt": "problem", "gold": "answer"}),
                        "math")
    # no id column: records are numbered in order; numbers become strings
    assert [(r["id"], r["prompt"], r["gold"]) for r in recs] == [("0", "P0", "0"), ("1", "P1", "1"), ("2", "P2", "2")]


def test_expand_samples_gives_distinct_ids_and_stable_seeds():
    rows = expand_samples([{"id": "a", "x": 1}, {"id": 7, "x": 2}], n=3, seed=5)
    assert [r["id"] for r in rows] == ["a#0", "a#1", "a#2", "7#0", "7#1", "7#2"]
    assert [r["sample_idx"] for r in rows] == [0, 1, 2] * 2 and rows[4]["prompt_id"] == "7" and rows[4]["x"] == 2
    assert len({r["seed"] for r in rows}) == 6
    assert rows[1]["seed"] == sample_seed(5, "a", 1) == expand_samples([{"id": "a"}], 2, 5)[1]["seed"]
    assert sample_seed(6, "a", 1) != sample_seed(5, "a", 1)


def test_parse_completion_maps_reasoning_finish_reasons_and_errors():
    body = {"choices": [{"message": {"content": "42", "reasoning_content": "think hard"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
    assert parse_completion(body) == {"completion": "<think>\nthink hard\n</think>\n\n42", "finish_reason": "stop",
                                      "prompt_tokens": 5, "completion_tokens": 9, "error": None}
    cut = {"choices": [{"message": {"content": "<think>x"}, "finish_reason": "length"}]}
    assert parse_completion(cut)["finish_reason"] == "length"
    filt = {"choices": [{"message": {"content": ""}, "finish_reason": "content_filter"}]}
    assert parse_completion(filt)["error"] == "finish_reason content_filter"
    err = parse_completion({"error": {"message": "context too long"}})
    assert err["finish_reason"] == "error" and err["error"] == "endpoint error: context too long"
