"""Importing existing teacher traces (teacher=dataset) into the generate stage's rows: one row per
trace in R1's format, with token counts and finish reasons, that the verify checks accept; mixing
imported and generated domains; and the preset end to end through generate and verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tinyr1"))
import tinyr1_data as T  # noqa: E402

from rdistill.cli.compose import load  # noqa: E402
from conftest import REPO  # noqa: E402
from fake_openai_server import FakeOpenAI  # noqa: E402
from gen_helpers import write_prompts  # noqa: E402
from rdistill.config import ConfigError, validated  # noqa: E402
from rdistill.pipeline import run_stage  # noqa: E402
from rdistill.rundir import RunDir  # noqa: E402
from rdistill.verify.rows import check_row  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return T.write_all(tmp_path_factory.mktemp("tinyr1"))


def _generate(paths, run_dir, *extra) -> tuple[dict, dict]:
    cfg = load(["experiment=tinyr1_32b", *T.overrides(paths), f"run_dir={run_dir}", "stages=[generate]", *extra])
    m = run_stage(cfg, RunDir(cfg.run_dir), "generate")["result"]
    rows = {d: pq.read_table(Path(run_dir) / "generate" / f"{d}.parquet").to_pylist() for d in cfg.domains}
    return m, rows


def test_traces_import_into_verify_ready_rows(paths, tmp_path):
    m, rows = _generate(paths, tmp_path / "run")
    math = rows["math"]
    # correct generations only, ids by their place in the source (u1#1, u3#0, u4#1 are marked wrong)
    assert [r["id"] for r in math] == ["u1#0", "u2#0", "u2#1", "u4#0", "u5#0", "u5#1", "u5#2"]
    s = m["domains"]["math"]
    assert (s["source"], s["records"], s["prompts"], s["rows"], s["skipped_incorrect"], s["records_without_traces"]) == \
        ("imported", 5, 5, 7, 3, 1)
    assert m["backend"] == "dataset" and m["imported_domains"] == ["code", "math", "science"] and m["error_rows"] == 0
    r = math[2]
    assert r["completion"].startswith("<think>\nSeven sixes: 42.\n</think>")  # the opening tag put back
    assert r["finish_reason"] == "stop" and r["completion_tokens"] > 5 and r["prompt_tokens"] > 5
    assert r["teacher"] == "deepseek-r1" and r["gold"] == "42" and r["sample_idx"] == 1 and r["prompt_id"] == "u2"
    assert r["messages"][-1]["content"] == "Compute $6 \\times 7$.\nPlease reason step by step, and put your final " \
                                           "answer within \\boxed{}."
    for r in math:  # every imported math trace passes format, budget and math-verify
        assert check_row(r, "math", "python", 16384, None, None) == (None, "correct", r["gold"])
    # science: OpenThoughts (reasoning + solution) then s1K-1.1's R1 columns; no checkable gold
    sci = rows["science"]
    assert len(sci) == 6 and sci[-1]["completion"].startswith("<think>\nR1: Photosynthesis uses CO2.\n</think>\n\n")
    assert all(check_row(r, "science", "python", 16384, None, None, require_correct=False)[0] is None for r in sci)
    # code: run on each problem's test_cases (stdin, and APPS call-based with fn_name)
    verdicts = [check_row(r, "code", "python", 16384, None, None)[:2] for r in rows["code"]]
    assert verdicts == [(None, "passed"), (None, "passed"), ("incorrect", "tests failed: case 0: wrong output")]


def test_incorrect_and_cut_traces_when_asked_for(paths, tmp_path):
    m, rows = _generate(paths, tmp_path / "run", "domains.math.train.traces.keep_incorrect=true")
    math = {r["id"]: r for r in rows["math"]}
    assert len(math) == 10 and m["domains"]["math"]["finish_reasons"] == {"stop": 8, "length": 2}
    assert math["u3#0"]["finish_reason"] == "length" and math["u4#1"]["finish_reason"] == "length"
    assert check_row(math["u3#0"], "math", "python", 16384, None, None)[0] == "incomplete"
    assert check_row(math["u1#1"], "math", "python", 16384, None, None)[:2] == ("incorrect", "wrong answer")


def test_list_columns_of_s1k(paths, tmp_path):
    # simplescaling/s1K keeps its (Gemini) trajectories as a list column: joined into one reasoning
    m, rows = _generate(paths, tmp_path / "run", f"domains.science.extra_train.0.path={paths['s1k']}",
                        "domains.science.extra_train.0.traces.reasoning=thinking_trajectories",
                        "domains.science.extra_train.0.traces.answer=attempt")
    assert rows["science"][-1]["completion"] == ("<think>\nPhotosynthesis uses CO2.\n</think>\n\n"
                                                 "Carbon dioxide. Answer: B")


def test_dataset_teacher_needs_traces_everywhere(paths, tmp_path):
    cfg = load(["experiment=tinyr1_32b", *T.overrides(paths), f"run_dir={tmp_path}/run", "stages=[generate]",
                "domains.science.extra_train.0.traces=null"])
    with pytest.raises(ConfigError) as e:
        run_stage(cfg, RunDir(cfg.run_dir), "generate")
    assert str(e.value).startswith("domains.science.extra_train[0] declares no traces but domain science is imported")
    with pytest.raises(ConfigError, match="set either generations .* or reasoning . answer"):
        load(["experiment=tinyr1_32b", "domains.math.train.traces.reasoning=x"])


@pytest.mark.slow
def test_imported_and_generated_domains_in_one_run(paths, tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv("RDISTILL_TEST_API_KEY", "sk-test")
    prompts = write_prompts(tmp_path / "arith.jsonl", 6, domain="arith")
    with FakeOpenAI(api_key="sk-test") as srv:
        cfg = validated({
            "run_dir": str(tmp_path / "run"), "stages": ["generate"], "ray": {"num_cpus": 8},
            "student": {"base": str(paths["tokenizer"])},
            "teacher": {"backend": "openai", "name": "fake-r1", "model": "fake", "base_url": srv.url,
                        "api_key_env": "RDISTILL_TEST_API_KEY", "import_traces": True, "batch_size": 4},
            "domains": {"math": {"kind": "math", "train": {"path": str(paths["openr1"]), "fields": {"id": "uuid", "prompt": "problem", "gold": "answer"},
                                                           "traces": {"generations": "generations", "correct": "correctness_math_verify"}}},
                        "arith": {"kind": "math", "train": {"path": str(prompts)}}},
            "generate": {"block_rows": 4, "probe_prompts": 0, "sampling": {"n": 2, "max_tokens": 64}}})
        m = run_stage(cfg, RunDir(cfg.run_dir), "generate")["result"]
        asked = set(srv.requests)
    assert asked == {f"What is {i} + {i}?" for i in range(6)}  # the imported domain sent nothing
    assert m["domains"]["math"]["source"] == "imported" and m["domains"]["arith"]["source"] == "generated"
    assert m["imported_rows"] == 7 and m["generated_rows"] == 12 and m["rows"] == 19
    arith = pq.read_table(tmp_path / "run" / "generate" / "arith.parquet").to_pylist()
    assert len(arith) == 12 and all(r["teacher"] == "fake-r1" for r in arith)
    assert pq.read_table(tmp_path / "run" / "generate" / "math.parquet").num_rows == 7


@pytest.mark.slow
def test_preset_generate_and_verify_with_no_llm(paths, tmp_path):
    run = tmp_path / "run"
    args = ["experiment=tinyr1_32b", *T.overrides(paths), f"run_dir={run}", "stages=[generate,verify]",
            "device=cpu", "ray.num_cpus=4", "student.params_b=0.001"]
    p = subprocess.run([sys.executable, "jobs/run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    kept = [json.loads(line) for line in (run / "verify" / "math.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == ["u1#0", "u2#0", "u2#1", "u4#0", "u5#0", "u5#1", "u5#2"]
    assert kept[0]["messages"][-1]["role"] == "assistant" and kept[0]["messages"][-1]["content"].startswith("<think>")
    funnel = {d: dict(f) for d, f in json.loads((run / "verify" / "manifest.json").read_text())["result"]["funnel"].items()}
    assert funnel["math"]["generated"] == 7 and funnel["math"]["kept"] == 7
    assert funnel["code"]["correct"] == 2 and funnel["science"]["kept"] == 6
