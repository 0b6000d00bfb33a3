"""The verify stage on a hand-made generate output: each row's fate is known, so the funnel's
counts, the dropped rows' reasons and the SFT set's format are checked exactly."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from rdistill import pipeline
from rdistill.config import validated
from rdistill.rundir import RunDir, write_json_atomic
from rdistill.verify.dedup import ContaminationIndex, find_duplicates, minhash

T = "<think>{r}</think> {a}"
LONG = " ; ".join(f"step {i}: {i}+{i}={2 * i}" for i in range(40))  # long enough to be near-duplicated


def _row(pid, k, domain, prompt, completion, gold=None, finish="stop", tokens=20, tests=None, entry=None):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    return {"id": f"{pid}#{k}", "prompt_id": pid, "sample_idx": k, "domain": domain, "messages": msgs,
            "prompt": prompt, "completion": completion, "finish_reason": finish, "prompt_tokens": 9,
            "completion_tokens": tokens, "teacher": "hand", "sampling": "{}", "error": None,
            "gold": gold, "tests": tests, "entry_point": entry}


# (row, expected drop reason or None when kept)
MATH = [
    (_row("m1", 0, "math", "Add 40 and 45.", T.format(r=LONG, a=r"The answer is \boxed{85}."), "85"), None),
    (_row("m1", 1, "math", "Add 40 and 45.", T.format(r=LONG, a=r"The answer is \boxed{85}."), "85"), "duplicate"),
    (_row("m1", 2, "math", "Add 40 and 45.", T.format(r=LONG + " ; ok", a=r"The answer is \boxed{85}."), "85"),
     "near_duplicate"),
    (_row("m2", 0, "math", "Halve one.", T.format(r="1/2", a=r"\boxed{0.5}"), "1/2"), None),
    (_row("m3", 0, "math", "Add 1 and 1.", "<think>1+1", "2", finish="length"), "incomplete"),
    (_row("m4", 0, "math", "Add 2 and 2.", r"4 is \boxed{4}", "4"), "bad_format"),
    (_row("m5", 0, "math", "Add 3 and 3.", T.format(r="3+3", a=r"\boxed{6}"), "6", tokens=999), "over_budget"),
    (_row("m6", 0, "math", "What is seven plus eight?", T.format(r="7+8", a=r"\boxed{15}"), "15"), "contaminated"),
    (_row("m7", 0, "math", "Add 5 and 5.", T.format(r="5+5", a=r"\boxed{11}"), "10"), "incorrect"),
    (_row("m8", 0, "math", "Add 6 and 6.", T.format(r="6+6", a=r"\boxed{12}"), "12"), None),
    (_row("m8", 1, "math", "Add 6 and 6.", T.format(r="six and six", a=r"\boxed{12}"), "12"), "over_sample_cap"),
]
CODE_TESTS = dict(tests="assert f(1) == 5\nassert f(2) == 8", entry="f")
PROG = "<think>{r}</think>\n```python\ndef f(x):\n    return {body}\n```"
CODE = [
    (_row("c1", 0, "code", "Write f(x) = 3x+2.", PROG.format(r="3x+2", body="x*3+2"), **CODE_TESTS), None),
    (_row("c1", 1, "code", "Write f(x) = 3x+2.", PROG.format(r="3x", body="x*3"), **CODE_TESTS), "incorrect"),
    (_row("c2", 0, "code", "Write f(x) = 3x+2 again.", PROG.format(r="boom", body="1/0"), **CODE_TESTS), "incorrect"),
    (_row("c3", 0, "code", "Write f(x) = 3x+2 once more.", PROG.format(r="loop", body="sum(iter(int, 1))"),
          **CODE_TESTS), "incorrect"),
]
SCIENCE = [
    (_row("s1", 0, "science", "Which is longest? A) 1 m B) 3 km", T.format(r="B 3000 m", a="Answer: B"), "B"), None),
    (_row("s1", 1, "science", "Which is longest? A) 1 m B) 3 km", T.format(r="B is big", a="The answer is (B)."), "B"),
     "over_sample_cap"),  # correct, but the cap keeps one sample per prompt
    (_row("s2", 0, "science", "Which is lightest? A) 1 g B) 3 kg", T.format(r="B", a="Answer: B"), "A"), "incorrect"),
]


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "generate").mkdir()
    for name, rows in (("math", MATH), ("code", CODE), ("science", SCIENCE)):
        pd.DataFrame([r for r, _ in rows]).to_parquet(tmp_path / "generate" / f"{name}.parquet")
    write_json_atomic(tmp_path / "generate" / "manifest.json", {"fingerprint": "hand-made"})
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"id": "t1", "prompt": "what is SEVEN plus eight?", "gold": "15"}) + "\n")
    return tmp_path, evals


def _cfg(root, evals):
    dom = lambda kind: {"kind": kind, "train": {"path": str(evals)}, "test": {"path": str(evals)}}
    return validated({"run_dir": str(root), "teacher": {"model": "hand"}, "student": {"base": "hand"},
                      "domains": {"math": dom("math"), "code": dom("code"), "science": dom("science")},
                      "verify": {"max_completion_tokens": 100, "decontam_ngram": 13, "max_samples_per_prompt": 1,
                                 "sandbox": {"timeout_s": 8.0, "cpu_s": 1}}})


def _expected_funnel(rows):
    steps = ["generated", "complete", "formatted", "within_budget", "decontaminated", "checked", "correct",
             "deduplicated", "kept"]
    order = [None, "incomplete", "bad_format", "over_budget", "contaminated", "unverified_infra", "incorrect",
             "duplicate", "over_sample_cap"]
    reasons = ["duplicate" if why == "near_duplicate" else why for _, why in rows]
    return {s: len(rows) - sum(1 for r in reasons if r is not None and order.index(r) <= i)
            for i, s in enumerate(steps)}


@pytest.mark.slow
def test_funnel_reasons_and_sft_format(run_dir, ray_cluster):
    root, evals = run_dir
    cfg = _cfg(root, evals)
    manifest = pipeline.run_stage(cfg, RunDir(root), "verify")
    res = manifest["result"]
    for name, rows in (("math", MATH), ("code", CODE), ("science", SCIENCE)):
        assert res["funnel"][name] == [list(kv) for kv in _expected_funnel(rows).items()], name  # in order
        kept = [json.loads(line) for line in (root / "verify" / f"{name}.jsonl").read_text().splitlines()]
        assert sorted(k["id"] for k in kept) == sorted(r["id"] for r, why in rows if why is None)
        for k in kept:  # chat format: the prompt as sent, then the teacher's full answer
            src = next(r for r, _ in rows if r["id"] == k["id"])
            assert set(k) == {"id", "prompt_id", "domain", "messages", "completion_tokens"}
            assert k["messages"] == src["messages"] + [{"role": "assistant", "content": src["completion"]}]
            assert k["messages"][-1]["content"].startswith("<think>") and k["domain"] == name
        dropped = pd.read_parquet(root / "verify" / "dropped" / f"{name}.parquet")
        assert dict(zip(dropped["id"], dropped["reason"])) == {r["id"]: why for r, why in rows if why is not None}
    code = pd.read_parquet(root / "verify" / "dropped" / "code.parquet").set_index("id")["detail"]
    assert code["c1#1"].startswith("tests failed") and code["c2#0"].startswith("crashed: ZeroDivisionError")
    assert code["c3#0"].startswith("timeout")
    assert res["dropped"]["math"]["near_duplicate"] == 1 and res["rows"] == len(MATH + CODE + SCIENCE)


@pytest.mark.slow
def test_missing_generate_output_is_one_clear_line(run_dir, ray_cluster):
    root, evals = run_dir
    (root / "generate" / "code.parquet").unlink()
    with pytest.raises(Exception, match="run the generate stage first"):
        pipeline.run_stage(_cfg(root, evals), RunDir(root), "verify")


def test_decontamination_and_near_duplicates_units():
    ix = ContaminationIndex(["What is seven plus eight?", " ".join(f"w{i}" for i in range(20))], 13)
    assert ix.match("Q: what is Seven plus eight? Go.") == "what is seven plus eight ?"
    assert ix.match("What is seven plus eight and then nine?") is None  # a different question
    assert ix.match(" ".join(f"w{i}" for i in range(3, 16))) is not None  # a shared 13-gram
    assert ix.match(" ".join(f"w{i}" for i in range(3, 15))) is None  # only 12 shared words
    a, b = "x " + LONG, "x " + LONG + " ; ok"
    drop = find_duplicates(["2", "1", "3"], ["k", "k", "other"], [minhash(a), minhash(a), minhash(b)], 0.9)
    assert drop == {"2": ("duplicate", "1"), "3": ("near_duplicate", "1")}
    assert find_duplicates(["1", "2"], ["k1", "k2"], [minhash("Add 40 and 45"), minhash("Add 41 and 46")], 0.9) == {}
