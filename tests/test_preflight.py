"""Preflight checks: each failure is triggered and reported in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from compose import load
from rdistill.preflight import (PreflightError, check_merge_inputs, check_run_dir,
                                check_student_tokenizer, check_teacher_format)
from rdistill.rundir import RunDir
from rdistill.toy.model import tiny_test_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_test_model(tmp_path_factory.mktemp("tiny") / "m")


def _one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_run_dir_must_be_writable_and_have_room(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError) as e:
        check_run_dir(RunDir(tmp_path / "file" / "run"))
    assert "is not writable" in _one_line(e)
    with pytest.raises(PreflightError) as e:
        check_run_dir(RunDir(tmp_path / "run"), need_bytes=1e18)
    assert "GB free but the run needs" in _one_line(e)
    check_run_dir(RunDir(tmp_path / "run"), need_bytes=1)


def test_student_tokenizer_needs_chat_template_and_eot_stop(tiny, tmp_path):
    check_student_tokenizer(str(tiny))  # the good one passes
    no_tpl = tmp_path / "no_tpl"
    shutil.copytree(tiny, no_tpl)
    (no_tpl / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((no_tpl / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (no_tpl / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(PreflightError) as e:
        check_student_tokenizer(str(no_tpl))
    assert "has no chat template" in _one_line(e)

    bad_eos = tmp_path / "bad_eos"
    shutil.copytree(tiny, bad_eos)
    gc = json.loads((bad_eos / "generation_config.json").read_text())
    gc["eos_token_id"] = [5]
    (bad_eos / "generation_config.json").write_text(json.dumps(gc))
    with pytest.raises(PreflightError) as e:
        check_student_tokenizer(str(bad_eos))
    assert "eos_token_id to the end-of-turn token" in _one_line(e)


def test_merge_inputs_share_architecture_and_vocab(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    c = json.loads((other / "config.json").read_text())
    c["vocab_size"] += 7
    (other / "config.json").write_text(json.dumps(c))
    cfg = load([f"run_dir={tmp_path}/run",
                f"merge.candidates.0.steps.0.models=[{{model: {other}}}]"])
    with pytest.raises(PreflightError) as e:
        check_merge_inputs(cfg, RunDir(cfg.run_dir), str(tiny))
    assert "vocab" in _one_line(e) and "step mid" in str(e.value)
    cfg_ok = load([f"run_dir={tmp_path}/run", f"merge.candidates.0.steps.0.models=[{{model: {tiny}}}]"])
    check_merge_inputs(cfg_ok, RunDir(cfg_ok.run_dir), str(tiny))


def test_teacher_format_probe():
    check_teacher_format(["<think>a</think> The answer is \\boxed{1}.", "no think"])
    with pytest.raises(PreflightError) as e:
        check_teacher_format(["The answer is 1.", "Sure! 2"])
    assert "close a </think> block" in _one_line(e)
