"""The evaluate stage end to end: real vLLM engines (tiny random students) and an HTTP teacher
whose answers are right on known prompts, real Ray Data pipelines run two at a time, the verify
stage's scorers; then the report stage on what it wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from fake_openai_server import FakeOpenAI
from rdistill.config import to_dict, validated
from rdistill.prompts.eval_rows import prompt_records, sample_rows
from rdistill.evaluate.stage import dev_selection
from rdistill.rundir import RunDir, write_json_atomic

SUFFIX = "\nPut the answer in \\boxed{}."
TEACHER_RIGHT = {0, 2, 3}  # test prompts whose gold equals what the fake teacher answers


def _write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _math_prompts(path: Path, split: str, n: int) -> str:
    """The fake teacher answers \\boxed{len(user message)}: gold is that on TEACHER_RIGHT prompts."""
    rows = []
    for i in range(n):
        prompt = f"{split} question {i}: add {i} and {i + 7}"
        right = len(prompt + SUFFIX)
        rows.append({"id": f"q{i}", "prompt": prompt,
                     "gold": str(right if (split == "test" and i in TEACHER_RIGHT) else right + 1)})
    return _write(path, rows)


def _cfg(tmp: Path, teacher_url: str | None = None, domains=("math", "science"), **eval_kw) -> object:
    def cand(name):
        return {"name": name, "steps": [{"name": "final", "merge_method": "linear",
                                         "models": [{"model": "branch:math"}]}]}
    doms = {
        "math": {"kind": "math", "train": {"path": "unused.jsonl"}, "dev": {"path": str(tmp / "dev.jsonl")},
                 "test": {"path": str(tmp / "test.jsonl")}, "system_prompt": "Think first.",
                 "instruction_suffix": SUFFIX},
        "science": {"kind": "science", "train": {"path": "unused.jsonl"}, "dev": {"path": str(tmp / "sdev.jsonl")},
                    "test": {"path": str(tmp / "stest.jsonl")}, "eval_samples": 3},
    }
    return validated({
        "run_dir": str(tmp / "run"), "stages": ["evaluate", "report"],
        "student": {"base": str(tmp / "model"), "max_model_len": 256},
        "teacher": {"name": "fake-r1", "backend": "openai", "model": "fake",
                    "base_url": teacher_url or "http://127.0.0.1:9/v1", "api_key_env": None},
        "domains": {d: doms[d] for d in domains},
        "merge": {"candidates": [cand("a"), cand("b")], "objective": "mean"},
        "eval": {"sampling": {"n": 2, "max_tokens": 24, "seed": 5}, "max_prompts": 5,
                 "concurrency": 2, "batch_size": 16, **eval_kw},
    })


@pytest.fixture
def prompt_files(tmp_path):
    _math_prompts(tmp_path / "test.jsonl", "test", 6)
    _math_prompts(tmp_path / "dev.jsonl", "dev", 3)
    sci = [{"id": f"s{i}", "prompt": f"Which is longest? A) {i} m B) {i + 1} km", "gold": "B"} for i in range(2)]
    _write(tmp_path / "stest.jsonl", sci)
    _write(tmp_path / "sdev.jsonl", sci[:1])
    return tmp_path


def test_rows_match_generate_prompts_and_per_domain_samples(prompt_files):
    from rdistill.prompts.sources import chat_messages
    cfg = _cfg(prompt_files)
    recs = prompt_records(cfg, "math", "test", str)
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "q3", "q4"]  # eval.max_prompts=5 of 6
    rows = sample_rows(cfg, "math", "test", recs)
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10 and len({r["seed"] for r in rows}) == 10
    assert rows[0]["messages"] == chat_messages(recs[0]["prompt"], "Think first.", SUFFIX)
    assert rows[0]["prompt_id"] == "math/test/q0" and rows[0]["kind"] == "math"
    sci = sample_rows(cfg, "science", "test", prompt_records(cfg, "science", "test", str))
    assert len(sci) == 2 * 3  # domains.science.eval_samples overrides eval.sampling.n


def test_dev_selection_picks_the_best_objective(prompt_files):
    cfg = _cfg(prompt_files)
    rows = []
    for model, acc in (("merge:a", {"math": [1, 0], "science": [0, 0]}),      # mean .25, min 0
                       ("merge:b", {"math": [0, 0], "science": [1, 0]})):     # mean .25
        for d, cs in acc.items():
            rows += [{"model": model, "domain": d, "split": "dev", "prompt_id": f"{d}/{i}",
                      "correct": bool(c), "error": None} for i, c in enumerate(cs)]
    rows += [{"model": "merge:b", "domain": "math", "split": "dev", "prompt_id": "math/9",
              "correct": True, "error": None}]  # b: math 1/3, science 1/2 -> mean .417
    sel = dev_selection(cfg, pd.DataFrame(rows))
    assert sel["candidate"] == "b" and sel["path"] == "merge/b/final"
    assert sel["scores"]["a"]["objective"] == pytest.approx(0.25)
    assert sel["scores"]["b"]["domains"] == {"math": pytest.approx(1 / 3), "science": 0.5}


@pytest.mark.slow
def test_evaluate_and_report_stages_end_to_end(prompt_files, ray_cluster):
    from rdistill.pipeline import run_stage
    from rdistill.report.stage import table_from_report
    from rdistill.toy.model import tiny_test_model
    tmp = prompt_files
    tiny_test_model(tmp / "model")
    run = RunDir(tmp / "run")
    # The students: the branches and both merge candidates are the tiny model (links), so
    # every vLLM model row really loads and generates; the train/merge/verify manifests are
    # what those stages would leave.
    for rel in ("train/math", "merge/a/final", "merge/b/final"):
        (run.root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(tmp / "model", run.root / rel)
    for stage in ("train", "merge", "generate", "verify"):
        write_json_atomic(run.stage_dir(stage) / "manifest.json", {"fingerprint": stage, "result": {}})
    with FakeOpenAI() as teacher:
        # one domain, four student models (base, branch, two candidates) on two engines
        cfg = _cfg(tmp, teacher.url, domains=("math",))
        write_json_atomic(run.root / "config.json", to_dict(cfg))  # as run_pipeline does
        manifest = run_stage(cfg, run, "evaluate")
    out = run.stage_dir("evaluate")
    # warm engines: four student models of one family on two engines, weights reloaded in between
    res = manifest["result"]
    assert res["engine_starts"] == 2 and res["weight_reloads"] == 2, res
    results = json.loads((out / "results.json").read_text())
    samples = pd.read_parquet(out / "samples.parquet")

    models = ["base", "branch:math", "merge:a", "merge:b", "teacher"]
    assert [r["model"] for r in results] == models
    # rows: every model on test (5 of 6 prompts x 2 samples), the candidates also on dev (3 x 2)
    assert len(samples) == 5 * 10 + 2 * 6
    assert samples.groupby("model")["id"].nunique().to_dict() == {
        "base": 10, "branch:math": 10, "merge:a": 16, "merge:b": 16, "teacher": 10}
    for r in results:
        mine = samples[(samples["model"] == r["model"]) & (samples["split"] == "test")]
        per_prompt = mine.groupby("prompt_id")["correct"].mean()
        assert r["pass_at_1"] == pytest.approx(per_prompt.mean(), abs=1e-6)
        assert (r["domain"], r["n_prompts"], r["n_samples"]) == ("math", 5, 2)
    by = {r["model"]: r for r in results}
    # the teacher's exact oracle: right on TEACHER_RIGHT among the first 5 prompts, every sample
    assert by["teacher"]["pass_at_1"] == pytest.approx(len(TEACHER_RIGHT) / 5)
    assert by["teacher"]["stderr"] == pytest.approx(((3 * 0.4 ** 2 + 2 * 0.6 ** 2) / 4) ** 0.5 / 5 ** 0.5)
    assert set(samples[samples["model"] == "teacher"]["reason"]) == {"correct", "wrong answer"}
    # vLLM students really generated (a random model is cut at max_tokens or answers nonsense)
    st = samples[samples["model"] == "base"]
    assert (st["completion_tokens"] > 0).all() and not st["correct"].any()
    assert st["seed"].nunique() == 10

    sel = json.loads((out / "selection.json").read_text())
    assert sel["candidate"] in ("a", "b") and sel["path"] == f"merge/{sel['candidate']}/final"
    objs = {n: s["objective"] for n, s in sel["scores"].items()}
    assert set(objs) == {"a", "b"} and objs[sel["candidate"]] == max(objs.values())
    from rdistill.refs import chosen_merge
    assert chosen_merge(run) == run.root / sel["path"]

    run_stage(cfg, run, "report")
    md = (run.stage_dir("report") / "report.md").read_text()
    assert "| teacher (fake-r1) | 60.0 | 60.0 |" in md
    table = table_from_report(run.stage_dir("report") / "report.md")
    assert [line.split()[0] for line in table.splitlines()[2:]] == models


def test_targets_every_model_of_the_run_and_missing_models(prompt_files, tmp_path):
    from rdistill.config.fields import ConfigError
    from rdistill.evaluate.targets import eval_targets
    cfg = _cfg(prompt_files, "http://127.0.0.1:9/v1")
    (prompt_files / "model").mkdir(exist_ok=True)
    run = RunDir(prompt_files / "run")
    for rel in ("train/math", "train/science", "merge/a/final", "merge/b/final"):
        (run.root / rel).mkdir(parents=True, exist_ok=True)
    from rdistill.refs import resolve_model
    ts = eval_targets(cfg, lambda ref: resolve_model(ref, run, cfg.student.base))
    assert [t.name for t in ts] == ["base", "branch:math", "branch:science", "merge:a", "merge:b", "teacher"]
    assert [t.splits for t in ts] == [("test",)] * 3 + [("test", "dev")] * 2 + [("test",)]
    assert ts[3].spec.model == str(run.root / "merge/a/final") and ts[3].spec.sampling.n == 2
    assert ts[-1].spec.backend == "openai" and ts[-1].spec.model == "fake"
    (run.root / "merge/b/final").rmdir()
    with pytest.raises(ConfigError, match="merge:b is missing"):
        eval_targets(cfg, lambda ref: resolve_model(ref, run, cfg.student.base))


def test_score_rows_uses_the_verifiers_and_counts_cut_or_failed_samples_wrong():
    from rdistill.scoring.verifiers import score_rows
    base = {"kind": "math", "language": "python", "gold": "42", "tests": None, "entry_point": None,
            "error": None, "finish_reason": "stop"}
    rows = [dict(base, completion="<think>40+2</think> The answer is \\boxed{42}."),
            dict(base, completion="<think>40+2</think> The answer is \\boxed{41}."),
            dict(base, completion="<think>40+2</think> The answer is \\boxed{42", finish_reason="length"),
            dict(base, completion="", finish_reason="error", error="HTTP 500"),
            dict(base, kind="science", gold="B", completion="<think>km > m</think> Answer: B")]
    out = score_rows(pd.DataFrame(rows))
    assert out["correct"].tolist() == [True, False, False, False, True]
    assert out["reason"].tolist() == ["correct", "wrong answer", "incomplete (length)", "generation error",
                                      "correct"]
    assert out["extracted"].tolist()[-1] == "B"
