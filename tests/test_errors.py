"""Every expected failure of `jobs/run.py` ends with one line on stderr naming what is wrong and
how to fix it, and a non-zero exit; no traceback (that goes to the run's log file)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def run(args: list[str], timeout: int = 240, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "jobs/run.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess, *must: str) -> str:
    assert p.returncode != 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    for m in must:
        assert m in errors[0], errors[0]
    return errors[0]


def test_bad_config_value(tmp_path):
    one_line_error(run([f"run_dir={tmp_path}", "train.lr=-1"]), "train.lr=-1.0 is invalid")


def test_unusable_sandbox_stops_before_any_work(tmp_path):
    line = one_line_error(run([f"run_dir={tmp_path}", "verify.sandbox.python=/nonexistent/python"]),
                          "/nonexistent/python", "verify.sandbox.python")
    assert not (tmp_path / "toy").exists() and not (tmp_path / "generate").exists()
    # the traceback is kept for debugging, in the log file the line points at
    log = line.split("(details: ")[1].rstrip(")")
    assert "SandboxUnavailable" in open(log).read()


def test_missing_model(tmp_path):
    one_line_error(run([f"run_dir={tmp_path}", "stages=[generate]", "teacher.model=/nonexistent/teacher"]),
                   "teacher.model=/nonexistent/teacher", "no model at")


def test_unreachable_endpoint(tmp_path):
    one_line_error(run([f"run_dir={tmp_path}", "stages=[generate]", "teacher=openai_endpoint",
                        "teacher.model=r1", "teacher.base_url=http://127.0.0.1:9/v1", "teacher.api_key_env=null"]),
                   "teacher.base_url=http://127.0.0.1:9/v1 is unreachable")


def test_bad_data_record(tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"id": "a", "prompt": "What is 2 + 2?", "gold": "4"}\n{not json\n')
    one_line_error(run([f"run_dir={tmp_path / 'run'}", "stages=[generate]", "generate.on_bad_record=fail",
                        "teacher.model=rdistill/toy/assets/teacher", f"domains.math.train.path={src}",
                        "domains.math.dev=null", "domains.math.test=null", "student.base=rdistill/toy/assets/base",
                        "~domains.code", "~domains.science"]), "malformed JSON on line 2")


def test_empty_sft_set(tmp_path):
    """A verify stage that kept nothing: training refuses the empty set in one line."""
    from rdistill import pipeline
    from rdistill.cli.compose import load
    from rdistill.rundir import RunDir
    run_dir = tmp_path / "run"
    cfg = load([f"run_dir={run_dir}", "stages=[toy]", "~domains.code", "~domains.science"])
    pipeline.run_stage(cfg, RunDir(cfg.run_dir), "toy")  # in this process: one jobs/run.py start less
    verify = run_dir / "verify"
    verify.mkdir()
    (verify / "math.jsonl").write_text("")
    (verify / "manifest.json").write_text(json.dumps({"stage": "verify", "fingerprint": "x", "config_hash": "x",
                                                      "inputs": {}, "result": {}}))
    one_line_error(run([f"run_dir={run_dir}", "stages=[train]", "~domains.code", "~domains.science"]),
                   "is empty")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_out_of_disk(tmp_path):
    """The run directory on a 300 kB disk (a tmpfs in a mount namespace of its own)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = (f"mount -t tmpfs -o size=300k tmpfs {disk} && exec {sys.executable} jobs/run.py "
           f"run_dir={disk}/run stages=[toy]")
    p = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=240)
    one_line_error(p, "out of disk space")
