"""The tinyr1_32b preset's sources on local copies in each dataset's real schema: every source
loads with the preset's own settings, filters with lists and ranges, one-line errors for a
misspelled column or a filter that keeps nothing, expected_rows, dev sets disjoint from test,
AIME 2025 and MATH-500 as named test sets, and the dry run's data plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tinyr1"))
import tinyr1_data as T  # noqa: E402

from rdistill.cli.compose import load  # noqa: E402
from conftest import REPO  # noqa: E402
from rdistill.config import ConfigError, SourceConfig, validated  # noqa: E402
from rdistill.prompts.eval_rows import prompt_records, sample_rows, samples_per_prompt  # noqa: E402
from rdistill.prompts.evalsets import check_dev_test, split_records, domain_test_sets  # noqa: E402
from rdistill.prompts.sources import check_expected, load_records  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return T.write_all(tmp_path_factory.mktemp("tinyr1"))


def _preset(paths, *extra):
    return load(["experiment=tinyr1_32b", *T.overrides(paths), *extra])


def _source(cfg, key):
    dom, split, *idx = key.split(".")
    d = cfg.domains[dom]
    return getattr(d, split)[int(idx[0])] if idx else getattr(d, split)


def test_every_preset_source_loads_with_the_preset_settings(paths):
    cfg = _preset(paths)
    assert cfg.teacher.backend == "dataset"
    for key, want in T.COUNTS.items():
        dom, split = key.split(".")[:2]
        src = _source(cfg, key)
        if split in ("dev", "test", "extra_test"):
            recs = split_records(cfg, dom, "test" if split == "extra_test" else split, str, source=src)
        else:
            recs = load_records(src, dom, key=f"domains.{key}", with_traces=True)
            check_expected(src, len(recs), key)
        assert len(recs) == want, key
        assert all(r["id"] and r["prompt"] for r in recs), key
    # the preset's own sizes are what the real datasets yield (checked by check_expected on load)
    real = load(["experiment=tinyr1_32b"])
    assert real.domains["code"].test.expected_rows == 279 and real.domains["math"].train.expected_rows == 93733
    assert check_dev_test(cfg, str) == {
        "code": {"code": 3, "code dev": 2},
        "math": {"math": 3, "math/aime25": 3, "math/math500": 3, "math dev": 2},
        "science": {"science": 2, "science dev": 3}}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_local_openthoughts_copy_keeps_biology_chemistry_physics(paths, tmp_path, fmt):
    rows = T.openthoughts()
    if fmt == "parquet":
        copy = paths["openthoughts"]
    else:
        copy = tmp_path / "metadata.jsonl"
        copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load(["experiment=tinyr1_32b", f"domains.science.train.path={copy}"])
    recs = load_records(cfg.domains["science"].train, "science", with_traces=True)
    assert [rows[int(r["id"])]["domain"] for r in recs] == ["biology", "chemistry", "physics", "physics"]
    assert all(r["traces"][0]["completion"].startswith("<think>\n") for r in recs)


def test_filters_lists_ranges_and_sets(paths):
    def ids(**filt):
        return [r["id"] for r in load_records(SourceConfig(path=str(paths["lcb"]), adapter="livecodebench",
                                                           filter=filt), "code", with_tests=False)]
    assert ids(platform=["leetcode", "codeforces"]) == ["3350", "2050_B", "3100"]
    assert ids(contest_date={"ge": "2024-08-01", "lt": "2025-02-01"}) == ["abc365_a", "3350", "2050_B"]
    assert ids(contest_date={"lt": "2024-08-01"}, platform={"not_in": ["leetcode"]}) == ["abc340_b"]
    assert ids(contest_date={"gt": "2025-01-20T14:35:00"}) == ["abc395_a"]  # datetimes, not just dates
    m500 = SourceConfig(path=str(paths["math500"]), fields={"id": "unique_id", "prompt": "problem"},
                        filter={"level": {"ge": 2}})
    assert [r["id"] for r in load_records(m500, "math")] == ["test/precalculus/807.json"]
    with pytest.raises(ConfigError, match=r"domains.m.test.filter.level=.* a range or set uses the keys ge, gt"):
        validated({"domains": {"m": {"kind": "math", "train": {"path": "x.jsonl"},
                                     "test": {"path": "y.jsonl", "filter": {"level": {"between": [1, 2]}}}}}})


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_missing_column_and_empty_filter_fail_in_one_line(paths, tmp_path, fmt):
    src_path = paths["openthoughts"]
    if fmt == "jsonl":
        src_path = tmp_path / "ot.jsonl"
        src_path.write_text("".join(json.dumps(r) + "\n" for r in T.openthoughts()))
    src = SourceConfig(path=str(src_path), fields={"prompt": "problem"}, filter={"domian": "code"})
    with pytest.raises(ConfigError) as e:
        load_records(src, "code", key="domains.code.train")
    msg = str(e.value)
    assert msg.startswith("domains.code.train: column 'domian' (named by filter.domian) is not in the source")
    assert "fix domains.code.train.filter.domian" in msg and "\n" not in msg
    src = SourceConfig(path=str(src_path), fields={"prompt": "problem"}, filter={"domain": ["Biology", "Physics"]})
    with pytest.raises(ConfigError) as e:
        load_records(src, "science", key="domains.science.train")
    msg = str(e.value)
    assert "keeps none of the 10 rows" in msg and "domain has values like biology, chemistry, code" in msg
    assert "fix domains.science.train.filter" in msg and "\n" not in msg
    src = SourceConfig(path=str(src_path), fields={"prompt": "problme"})
    with pytest.raises(ConfigError, match=r"column 'problme' \(named by fields.prompt\)"):
        load_records(src, "math", key="domains.math.train")


def test_range_that_keeps_nothing_shows_the_column_range(paths):
    src = SourceConfig(path=str(paths["lcb"]), adapter="livecodebench", filter={"contest_date": {"ge": "2026-01-01"}})
    with pytest.raises(ConfigError, match=r"contest_date runs from 2024-02-10T00:00:00 to 2025-03-01T00:00:00"):
        load_records(src, "code", key="domains.code.test", with_tests=False)


def test_expected_rows_mismatch_stops_with_the_observed_count(paths, tmp_path):
    src = SourceConfig(path=str(paths["gpqa_diamond"]), expected_rows=198)
    with pytest.raises(ConfigError, match=r"domains.science.test yields 2 records but expected_rows=198 .*"
                                          r"set domains.science.test.expected_rows=2"):
        check_expected(src, 2, "domains.science.test")
    check_expected(SourceConfig(path="x", expected_rows=280), 279, "k")  # within the 5% tolerance
    # the generate stage checks before importing anything
    from rdistill.pipeline import run_stage
    from rdistill.rundir import RunDir
    cfg = _preset(paths, f"run_dir={tmp_path}/run", "stages=[generate]", "domains.math.train.expected_rows=93733")
    with pytest.raises(ConfigError, match=r"domains.math.train yields 5 records but expected_rows=93733"):
        run_stage(cfg, RunDir(cfg.run_dir), "generate")
    assert not (tmp_path / "run" / "generate").exists()


def test_dev_sets_disjoint_from_test_by_construction_and_overlap_caught(paths, tmp_path):
    cfg = _preset(paths)
    dev = split_records(cfg, "science", "dev", str)
    assert [r["id"] for r in dev] == ["recB2", "recC3", "recE5"]  # GPQA main minus Diamond
    # without exclude_test, main holds the Diamond questions: caught, named in one line
    cfg = _preset(paths, "domains.science.dev.exclude_test=false", "domains.science.dev.expected_rows=5")
    with pytest.raises(ConfigError) as e:
        check_dev_test(cfg, str)
    assert str(e.value).startswith("domains.science.dev prompt 'recA1' overlaps test set science prompt 'recA1' "
                                   "(the same prompt)") and "\n" not in str(e.value)
    # LiveCodeBench dev inside the test window (release_v4 inside release_v5)
    cfg = _preset(paths, "domains.code.dev.filter.contest_date.ge=2024-08-01", "domains.code.dev.filter.contest_date.lt=2025-02-01",
                  "domains.code.dev.exclude_test=false", "domains.code.dev.expected_rows=3")
    with pytest.raises(ConfigError, match=r"domains.code.dev prompt 'abc365_a' overlaps test set code"):
        check_dev_test(cfg, str)
    # an edited copy of a test problem (other id, a few words changed) is caught by its n-grams
    aime = T.aime(2025)
    near = [{"id": 99, "problem": aime[0]["problem"].replace("ordered pairs", "pairs") + " Explain briefly.",
             "answer": 24.0, "url": "https://artofproblemsolving.com/x"}, *T.amc()]
    pq.write_table(pa.Table.from_pylist(near), tmp_path / "dev.parquet")
    cfg = _preset(paths, f"domains.math.dev.path={tmp_path / 'dev.parquet'}", "domains.math.dev.expected_rows=3",
                  "verify.decontam_ngram=8")
    with pytest.raises(ConfigError, match=r"prompt '99' overlaps test set math/aime25 prompt '0' \(\d+% of their 8-grams"):
        check_dev_test(cfg, str)


def test_aime25_and_math500_are_named_test_sets(paths):
    cfg = _preset(paths)
    sets = domain_test_sets(cfg.domains["math"], "math")
    assert [n for n, _ in sets] == ["math", "math/aime25", "math/math500"]
    name, src = sets[1]
    recs = prompt_records(cfg, "math", "test", str, source=src)
    rows = sample_rows(cfg, "math", "test", recs, n=samples_per_prompt(cfg, "math", src), name=name)
    assert len(rows) == 3 * 16 and {r["domain"] for r in rows} == {"math/aime25"}
    assert rows[0]["id"] == "math/aime25/test/0#0" and rows[0]["kind"] == "math" and rows[0]["branch_domain"] == "math"
    assert rows[0]["messages"][-1]["content"].endswith("within \\boxed{}.") and rows[0]["gold"] == "24"
    assert samples_per_prompt(cfg, "math", sets[2][1]) == 4 and samples_per_prompt(cfg, "math") == 16
    with pytest.raises(ConfigError, match=r"domains.math.extra_test\[1\].name='aime25' is invalid: give each"):
        load(["experiment=tinyr1_32b", "domains.math.extra_test.1.name=aime25"])


def test_dry_run_says_imported_or_generated_per_domain(paths):
    from rdistill.dryrun import format_plan
    text = "\n".join(format_plan(_preset(paths), "here", {"CPU": 8, "GPU": 0}))
    assert "no model runs: existing deepseek-r1 traces are imported" in text
    for dom in ("math", "code", "science"):
        assert f"  {dom}: traces imported; train records:" in text
    assert f"{paths['openr1']} 5" in text and "test math/aime25 (" in text
    mixed = _preset(paths, "teacher=deepseek_r1_api", "teacher.import_traces=true", "domains.code.train.traces=null")
    text = "\n".join(format_plan(mixed, "here", {"CPU": 8, "GPU": 0}))
    assert "  code: generated by deepseek-r1 (openai: deepseek-reasoner)" in text
    assert "  math: traces imported" in text and "  science: traces imported" in text
    with pytest.raises(ConfigError, match=r"domains.code.train declares no traces but domain code is imported "
                                          r"\(teacher.backend=dataset\)"):
        format_plan(_preset(paths, "domains.code.train.traces=null"), "here", {})


def test_cli_dry_run_of_the_preset(tmp_path):
    p = subprocess.run([sys.executable, "jobs/run.py", "experiment=tinyr1_32b", "dry_run=true", f"run_dir={tmp_path}/r"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "teacher: deepseek-r1 (dataset: deepseek-ai/DeepSeek-R1)" in out
    assert "  math: traces imported; train records: open-r1/OpenR1-Math-220k/default 93733" in out
    assert "test code (livecodebench/code_generation_lite) 279" in out and "test math/math500 (HuggingFaceH4/MATH-500) 500" in out
    p = subprocess.run([sys.executable, "jobs/run.py", "experiment=tinyr1_32b", "dry_run=true", "teacher=deepseek_r1_api",
                        f"run_dir={tmp_path}/r"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "  math: generated by deepseek-r1 (openai: deepseek-reasoner)" in p.stdout


def test_hf_data_files_use_the_packaged_builder(paths, tmp_path):
    # LiveCodeBench's repository keeps a loading script that `datasets` refuses: its test*.jsonl
    # files are read with the json builder instead (hf://datasets/<name>/<file> on the hub).
    from rdistill.prompts.read import SourceReader
    repo = tmp_path / "code_generation_lite"
    repo.mkdir()
    rows = T.livecodebench()
    (repo / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (repo / "test2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    (repo / "code_generation_lite.py").write_text("# a loading script datasets no longer runs\n")
    src = SourceConfig(hf_name=str(repo), data_files=["test.jsonl", "test2.jsonl"], adapter="livecodebench",
                       filter={"contest_date": {"ge": "2024-08-01", "lt": "2025-02-01"}})
    assert [r["id"] for r in load_records(src, "code", tests_store=tmp_path / "s")] == ["abc365_a", "3350", "2050_B"]
    assert SourceReader._hf_args(SourceConfig(hf_name="livecodebench/code_generation_lite", data_files=["test5.jsonl"])) \
        == {"path": "json", "data_files": ["hf://datasets/livecodebench/code_generation_lite/test5.jsonl"]}
