"""The whole method end to end, as users run it: `ray job submit --working-dir . -- python jobs/run.py`
on a `ray start --head` cluster (conftest's `ray_head`; a dry run and an engine that cannot start
are submitted to the same head below), the toy world through real vLLM, Ray
Data, Ray Train + DeepSpeed, the merge, evaluation and report (smaller than the default run so that
CI stays short), then serving the merge on the cluster and one question to it; then, on this
machine with a plain `python jobs/run.py`, a rerun that skips every stage. (That a changed config
reruns only that stage and the ones after it is tested on the runner itself, in test_pipeline.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, VENV_BIN, free_port

pytestmark = pytest.mark.slow

# Smaller than the default run (CI time), big enough to show the branches' gains: 300 prompts
# per domain, 80 branch steps, 40 test prompts x 2 samples; the reference Fusion chain beside a
# merge search of 4 candidates that includes RegMean (its statistics are Ray tasks of the job);
# neither the teacher nor the mixture baseline (a third of the train stage's time here) is
# trained or evaluated: test_evaluate_stage.py scores a teacher, test_train_stage.py trains a
# mixture with fair per-domain exposure, test_report.py checks the report's mixture verdict.
SMALL = ["toy.n_train=300", "toy.n_dev=20", "toy.n_test=40", "eval.sampling.n=2", "train.max_steps=80",
         "merge=toy_fusion", "merge.search.enabled=true", "merge.search.candidates=4",
         "merge.search.methods=[regmean,task_arithmetic,ties]", "merge.search.first_prompts=10",
         "eval.include_teacher=false", "train.mixture_baseline=false"]
STAGES = ["toy", "generate", "verify", "train", "merge", "evaluate", "report"]
# What a finished job must not leave running on the cluster (Ray's idle workers may stay).
RUN_PROCESSES = ("EngineCore", "vLLMEngineStage", "WarmEngine", "RayTrainWorker", "TrainController",
                 "ServeReplica", "LLMServer", "ServeController", "ProxyActor")


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _ask(port: int, model: str) -> dict:
    body = json.dumps({"model": model, "max_tokens": 64, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is 12 + 30?"}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _leftovers(ray_head, wait_s: float = 90) -> list[str]:
    deadline = time.time() + wait_s
    while True:
        left = [c for c in ray_head.processes() if any(k in c for k in RUN_PROCESSES)]
        if not left or time.time() > deadline:
            return left
        time.sleep(3)


def test_default_pipeline_submitted_to_a_cluster_end_to_end_then_rerun_skips(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    t0 = time.time()
    p = ray_head.submit(f"run_dir={run_dir}", *SMALL, f"stages=[{','.join(STAGES)},serve]",
                        "serve.blocking=false", f"serve.port={port}", "serve.served_name=toy", timeout=1800)
    wall = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    for stage in STAGES:
        m = json.loads((run_dir / stage / "manifest.json").read_text())
        assert m["stage"] == stage and m["wall_time_s"] > 0
    # the SFT sets were built from verified teacher answers and the branches trained on them
    funnel = json.loads((run_dir / "verify" / "manifest.json").read_text())["result"]["funnel"]
    for domain in ("math", "code", "science"):
        f = dict(funnel[domain])
        assert f["generated"] == 300
        assert 0.8 * f["generated"] < f["kept"] <= f["generated"], (domain, f)  # the code funnel included
        assert (run_dir / "train" / domain / "model.safetensors").exists() or \
            list((run_dir / "train" / domain).glob("*.safetensors"))
    assert list((run_dir / "merge" / "fusion" / "final").glob("*.safetensors"))
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    models = {r["model"] for r in results}
    assert models == {"base", "branch:math", "branch:code", "branch:science", "merge:fusion", "merge:search"}
    for r in results:
        assert r["n_prompts"] == 40 and r["n_samples"] == 2 and 0.0 <= r["pass_at_1"] <= 1.0
    # the method's first claim, which this run has the power to show: every branch beats the
    # base on its own domain (more than two standard errors of the difference)
    score = {(r["model"], r["domain"]): r for r in results}
    for d in ("math", "code", "science"):
        b, br = score[("base", d)], score[(f"branch:{d}", d)]
        assert br["pass_at_1"] - b["pass_at_1"] > 2 * (b["stderr"] ** 2 + br["stderr"] ** 2) ** 0.5, (d, b, br)
    # the report says what the numbers say
    method = json.loads((run_dir / "report" / "manifest.json").read_text())["result"]["method"]
    assert method["claims"][0]["held"] is True
    assert method["held"] == all(c["held"] for c in method["claims"])
    sel = json.loads((run_dir / "evaluate" / "selection.json").read_text())
    assert method["merged"] == f"merge:{sel['candidate']}"
    # evaluation ran on warm engines, with no start of its own: the merge search's engine (one
    # on the toy) kept running into it, and the six students were reloaded into it (but the one
    # the search ended on, its base floor, which is already loaded)
    ev = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["result"]
    search = json.loads((run_dir / "merge" / "search.json").read_text())
    assert search["engine_starts"] == 1 and ev["engine_starts"] == 0 and ev["weight_reloads"] >= 5, (search, ev)
    # the search scored RegMean, whose statistics the job collected on the verified SFT sets
    assert any(c["label"].startswith("regmean ") for c in search["candidates"]), search
    # the run ends with the TinyR1-style table
    header = next(l for l in p.stdout.splitlines() if l.startswith("model "))
    assert header.split() == ["model", "code", "math", "science", "mean"]
    assert any(l.startswith("base (") for l in p.stdout.splitlines())
    assert (run_dir / "report" / "report.md").exists()
    print(f"end-to-end wall time: {wall:.0f}s")

    # the console: rdistill's lines, not the libraries' (the full stream is in the run's logs)
    assert "Traceback" not in p.stdout + p.stderr
    assert "Running Dataset" not in p.stdout + p.stderr  # Ray Data's progress blocks
    assert "Deployment Options" not in p.stdout + p.stderr  # Serve LLM's, as the serve stage starts
    assert "core_worker.cc" not in p.stdout + p.stderr  # Ray's C++ lines: logs/native.log
    assert (run_dir / "logs" / "workers.log").stat().st_size > 0

    # the merge is served on the cluster after the job returned, and answers
    answer = _ask(port, "toy")
    msg = answer["choices"][0]["message"]
    # 64 tokens may all be thinking: vLLM's reasoning parser puts them under `reasoning`
    # (`reasoning_content` before vLLM 0.11), and the content is then empty
    assert msg.get("content") or msg.get("reasoning") or msg.get("reasoning_content"), msg
    subprocess.run([f"{VENV_BIN}/serve", "shutdown", "--address", ray_head.url, "--yes"], env=ray_head.env,
                   capture_output=True, text=True, timeout=120, check=True)
    # the run left nothing running: engines, train workers, the serving replicas
    assert _leftovers(ray_head) == []

    # a rerun of the same command skips every stage and still prints the table
    p2 = _run([f"run_dir={run_dir}", *SMALL], timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}: current, skipped" in p2.stderr


# On the same head (one `ray start --head` per module, so CI pays for one): a dry run, and an
# engine that cannot start.
def test_job_submit_dry_run(ray_head, tmp_path):
    p = ray_head.submit("dry_run=true", f"run_dir={tmp_path}/dry")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "rdistill plan: run 'toy'" in p.stdout and "[train]" in p.stdout
    assert "cluster at" in p.stdout  # the job's driver saw RAY_ADDRESS and planned against the cluster


def test_job_submit_engine_that_cannot_start_is_one_line(ray_head, tmp_path):
    """An engine asked for more memory than its node has: the job ends in one line naming the
    setting (not Ray's ActorDiedError), and no traceback reaches the job's console."""
    p = ray_head.submit(f"run_dir={tmp_path}/run", "stages=[toy,generate]", "toy.n_train=4",
                        "teacher.engine.cpu_kvcache_gib=1000")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    # (ray job submit repeats the job's last lines when it fails: the same line twice)
    errors = sorted({l for l in out.splitlines() if l.startswith("error: ")})
    assert len(errors) == 1, out[-3000:]
    assert "1000 GiB KV cache" in errors[0] and "teacher.engine.cpu_kvcache_gib" in errors[0], errors
    assert "Traceback" not in out and "ActorDiedError" not in out, out[-3000:]
    # the engine's own traceback is kept, in the run's logs
    logs = "".join(f.read_text() for f in (tmp_path / "run" / "logs").glob("*.log"))
    assert "requested memory for kv" in logs
    assert json.loads((tmp_path / "run" / "toy" / "manifest.json").read_text())["stage"] == "toy"
