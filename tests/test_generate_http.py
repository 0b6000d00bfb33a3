"""The generate stage against a local fault-injecting OpenAI-compatible endpoint (Ray Data's HTTP
processor): retried faults, recorded failures, the error-share limit, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fake_openai_server import FakeOpenAI
from gen_helpers import config, read_output, write_prompts
from rdistill.config import ConfigError
from rdistill.generate import store
from rdistill.generate.stage import GenerationError
from rdistill.pipeline import run_stage
from rdistill.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
KEY_ENV = "RDISTILL_TEST_API_KEY"


@pytest.fixture(autouse=True)
def _listen_backlog(monkeypatch):
    """The standard library server's listen backlog of 5 makes a burst of connects (the HTTP
    teacher opens up to max_in_flight at once) wait a second for a SYN retry, longer than the
    1 s request timeout these tests use."""
    import fake_openai_server
    monkeypatch.setattr(fake_openai_server.ThreadingHTTPServer, "request_queue_size", 1024)


def _teacher(url: str, **kw) -> dict:
    return {"backend": "openai", "name": "fake-r1", "model": "fake-r1", "base_url": url,
            "api_key_env": KEY_ENV, "max_retries": 3, "retry_wait_s": 0.05, "timeout_s": 1.0,
            "batch_size": 4, **kw}


def _user(i: int) -> str:
    return f"What is {i} + {i}?\nBox it."


def test_missing_api_key_fails_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    p = write_prompts(tmp_path / "math.jsonl", 2)
    cfg = config(tmp_path / "run", {"math": p}, _teacher("http://127.0.0.1:9/v1"))
    with pytest.raises(ConfigError, match=f"environment variable {KEY_ENV} is not set"):
        run_stage(cfg, RunDir(cfg.run_dir), "generate")


@pytest.mark.slow
def test_endpoint_faults_are_retried_and_failures_recorded(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    p = write_prompts(tmp_path / "math.jsonl", 10)
    with FakeOpenAI(api_key="sk-test", hang_s=3.0, reasoning_split=True) as srv:
        srv.plan = {_user(1): ["429", "500"], _user(2): ["timeout"], _user(3): ["malformed", "503"],
                    _user(4): ["always:500"], _user(5): ["always:malformed"]}
        cfg = config(tmp_path / "run", {"math": p}, _teacher(srv.url),
                     sampling={"n": 2, "max_tokens": 64}, max_error_share=0.05)
        # 4 of 20 rows (prompts 4 and 5) fail every attempt: above the 5% share, the run stops.
        with pytest.raises(GenerationError, match=r"4 of 20 rows \(20.0%\) failed after retries"):
            run_stage(cfg, RunDir(cfg.run_dir), "generate")
        assert {"429", "500", "503", "timeout", "malformed"} <= set(srv.faults)
        # transient faults: retried until they succeed (prompts 0 and 1 also answer the probe)
        assert srv.requests[_user(1)] == 2 + 2 + 1 and srv.requests[_user(2)] == 1 + 2
        assert srv.requests[_user(4)] == 2 * (1 + 3)  # each sample: 1 try + max_retries
        failed = [r for _, t in store._tables(tmp_path / "run" / ".work" / "generate" / "out")
                  for r in t.to_pylist() if r["finish_reason"] == "error"]
        assert sorted(r["prompt_id"] for r in failed) == ["math-4", "math-4", "math-5", "math-5"]
        assert all("gave up after retries" in r["error"] for r in failed)

        # The endpoint recovers for prompt 5 only; the rerun sends just the 4 failed rows again
        # and stays under a 15% share with prompt 4's 2 rows still failing.
        srv.plan = {_user(4): ["always:500"]}
        srv.reset_counts()
        cfg = config(tmp_path / "run", {"math": p}, _teacher(srv.url),
                     sampling={"n": 2, "max_tokens": 64}, max_error_share=0.15)
        m = run_stage(cfg, RunDir(cfg.run_dir), "generate")["result"]
        assert set(srv.requests) == {_user(4), _user(5)} and srv.requests[_user(5)] == 2

    assert m["rows"] == 20 and m["resumed_rows"] == 16 and m["retried_error_rows"] == 4
    assert m["generated_rows"] == 4 and m["error_rows"] == 2 and m["error_share"] == 0.1
    assert m["domains"]["math"]["finish_reasons"] == {"stop": 18, "error": 2}
    rows = read_output(tmp_path / "run", "math")
    assert Counter((r["prompt_id"], r["sample_idx"]) for r in rows) == {
        (f"math-{i}", s): 1 for i in range(10) for s in range(2)}
    ok = [r for r in rows if r["finish_reason"] == "stop"]
    # reasoning_content from the endpoint comes back as <think>...</think> before the answer
    assert all(r["completion"].startswith("<think>\n") and "</think>" in r["completion"] for r in ok)
    assert all(r["error"] is None and r["completion_tokens"] == 8 and r["teacher"] == "fake-r1" for r in ok)
    assert [r["error"] for r in rows if r["finish_reason"] == "error"] == [
        "RuntimeError: gave up after retries: ClientPayloadError"] * 2
    assert json.loads(rows[0]["sampling"]) == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 64,
                                               "n": 2, "seed": 0}
    # the rerun's requests: 2 samples of each of 2 prompts, each sample with its own seed (the
    # server answers 401 unless the key from the environment is sent)
    assert len({(b["messages"][-1]["content"], b["seed"]) for b in srv.bodies}) == 4
    assert len({b["seed"] for b in srv.bodies}) == 4


KILL_DRIVER = """
import json, sys
sys.path[:0] = [{tests!r}, {repo!r}]
from gen_helpers import config
from rdistill.pipeline import run_stage
from rdistill.rundir import RunDir
cfg = config(**json.loads(sys.argv[1]))
cfg.ray.address = sys.argv[2]
run_stage(cfg, RunDir(cfg.run_dir), "generate")
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_each_row_exactly_once(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    n_prompts = 60
    p = write_prompts(tmp_path / "math.jsonl", n_prompts)
    run = tmp_path / "run"
    ckpt = run / ".work" / "generate" / "ckpt"
    log = tmp_path / "driver.log"
    with FakeOpenAI(api_key="sk-test", delay_s=0.25, serial=True) as srv:
        args = dict(run_dir=str(run), domains={"math": str(p)}, teacher=_teacher(srv.url, timeout_s=30.0),
                    sampling={"n": 1, "max_tokens": 64}, block_rows=4, probe_prompts=0)
        driver = subprocess.Popen(
            [sys.executable, "-c", KILL_DRIVER.format(tests=str(REPO / "tests"), repo=str(REPO)),
             json.dumps(args), ray_cluster.get_runtime_context().gcs_address],
            start_new_session=True, env={**os.environ}, stdout=log.open("w"), stderr=subprocess.STDOUT)
        t0 = time.time()
        while len(store.committed_ids(ckpt)) < 8 and time.time() - t0 < 240 and driver.poll() is None:
            time.sleep(0.1)
        assert driver.poll() is None, "driver ended early:\n" + log.read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's whole process group
        driver.wait()
        while time.monotonic() - srv.last_request < 2.0:  # the dead job's actors are gone
            time.sleep(0.2)
        committed = store.committed_ids(ckpt)
        first_run_requests = sum(srv.requests.values())
        assert 8 <= len(committed) < n_prompts, "the kill must land mid-run"
        srv.reset_counts()
        cfg = config(run, {"math": p}, _teacher(srv.url, timeout_s=30.0), sampling={"n": 1, "max_tokens": 64},
                     block_rows=4, probe_prompts=0)
        m = run_stage(cfg, RunDir(cfg.run_dir), "generate")["result"]
        rerun_requests = dict(srv.requests)

    rows = read_output(run, "math")
    assert Counter((r["prompt_id"], r["sample_idx"]) for r in rows) == {
        (f"math-{i}", 0): 1 for i in range(n_prompts)}
    assert all(r["finish_reason"] == "stop" for r in rows)
    # rows committed before the kill were not paid for again; every other row was, once
    committed_prompts = {_user(int(k.split("-")[1].split("#")[0])) for k in committed}
    assert not committed_prompts & set(rerun_requests)
    assert sum(rerun_requests.values()) == n_prompts - len(committed) == m["generated_rows"]
    assert m["resumed_rows"] == len(committed)
    print(f"\nkill/resume: {len(committed)}/{n_prompts} rows committed before SIGKILL, "
          f"{first_run_requests} requests before the kill, {sum(rerun_requests.values())} after; "
          f"{first_run_requests + sum(rerun_requests.values()) - n_prompts} rows paid twice")


class CountingOpenAI(FakeOpenAI):
    """The fake endpoint holding every answer `hold_s` seconds and counting the requests open at once."""

    def __init__(self, hold_s: float, **kw):
        super().__init__(**kw)
        self.hold_s, self.open_now, self.peak = hold_s, 0, 0

    def _fault_for(self, user: str):
        with self._lock:
            self.open_now += 1
            self.peak = max(self.peak, self.open_now)
        time.sleep(self.hold_s)
        with self._lock:
            self.open_now -= 1
        return super()._fault_for(user)


@pytest.mark.slow
def test_hundreds_of_requests_in_flight_bounded_by_max_in_flight(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    n_prompts, cap = 400, 200
    p = write_prompts(tmp_path / "math.jsonl", n_prompts)
    with CountingOpenAI(hold_s=2.0, api_key="sk-test") as srv:
        cfg = config(tmp_path / "run", {"math": p}, _teacher(srv.url, batch_size=8, max_in_flight=cap, timeout_s=30.0),
                     sampling={"n": 1, "max_tokens": 64}, block_rows=8, probe_prompts=0)
        t0 = time.time()
        m = run_stage(cfg, RunDir(cfg.run_dir), "generate")["result"]
        wall = time.time() - t0
    assert m["rows"] == n_prompts and m["error_rows"] == 0
    print(f"\npeak requests in flight: {srv.peak} (max_in_flight={cap}), {n_prompts} rows in {wall:.1f}s")
    assert 64 < srv.peak <= cap  # far above the 16 of one batch per actor, never above the cap
