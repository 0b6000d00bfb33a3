"""Experiment tracking: the config group, the figures each stage logs, the run tree's resume and
failure rules (with an in-memory backend), and, marked slow, the real thing: the pipeline runner
against a real `mlflow server` on loopback (stopped mid-test: the pipeline goes on with one
warning line) and W&B in offline mode."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdistill.cli.compose import load
from rdistill import pipeline
from rdistill.config import ConfigError
from rdistill.errors import ResourceError
from rdistill.log import log
from rdistill.tracking.figures import stage_figures
from rdistill.tracking.tailer import ProgressTailer
from rdistill.tracking.tracker import Tracker

DOMS = ["math", "code", "science"]
ALL = "stages=[toy,generate,verify,train,merge,evaluate,report]"


@pytest.fixture
def warnings_seen():
    """Warning lines of the rdistill logger (it does not propagate to the root, so caplog misses it)."""
    seen: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())
    h = H()
    log.addHandler(h)
    yield seen
    log.removeHandler(h)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _results(models=("base", "branch:math", "merge:fusion")) -> list[dict]:
    return [{"model": m, "domain": d, "n_prompts": 40, "n_samples": 4, "pass_at_1": 0.25 + 0.1 * i + 0.05 * j,
             "stderr": 0.03, "n_errors": 0} for i, m in enumerate(models) for j, d in enumerate(DOMS)]


# -- fast: config, figures, run-tree rules ----------------------------------------------------

def test_config_group_selects_typed_values():
    assert load([]).tracking.backend == "none"
    t = load(["tracking=mlflow", "tracking.uri=http://127.0.0.1:5000", "tracking.run_name=r1"]).tracking
    assert (t.backend, t.uri, t.experiment, t.run_name, t.required) == ("mlflow", "http://127.0.0.1:5000",
                                                                       "rdistill", "r1", False)
    assert load(["tracking=wandb", "tracking.entity=team"]).tracking.entity == "team"
    with pytest.raises(ConfigError, match="tracking.backend='neptune' is invalid"):
        load(["tracking.backend=neptune"])
    with pytest.raises(ConfigError, match="tracking.poll_s=0.0 is invalid: must be > 0"):
        load(["tracking.poll_s=0"])
    with pytest.raises(ConfigError, match="available tracking options: mlflow, none, wandb"):
        load(["tracking=neptune"])


def test_figures_of_each_stage(tmp_path):
    v = stage_figures("verify", {"wall_time_s": 3.5, "result": {"rows": 400, "funnel": {
        "math": [["generated", 400], ["complete", 380], ["kept", 300]]}}}, tmp_path)
    assert v.scalars["funnel/math/kept"] == 300 and v.scalars["funnel/math/kept_share"] == 0.75
    assert v.scalars["rows"] == 400 and v.scalars["wall_time_s"] == 3.5
    assert [v.steps[i]["funnel_curve/math"] for i in range(3)] == [400, 380, 300]

    ev = tmp_path / "evaluate"
    _dump(ev / "results.json", _results())
    _dump(ev / "manifest.json", {})
    e = stage_figures("evaluate", {"result": {"models": 3}}, ev)
    assert e.parent["pass_at_1/merge:fusion/code"] == pytest.approx(0.5)
    assert e.scalars["pass_at_1_stderr/base/math"] == 0.03 and e.scalars["models"] == 3
    assert {dest for _, dest in e.parent_artifacts} == {"manifests/evaluate"}
    assert all("models" not in str(d) for _, d in e.artifacts)  # weights only when asked
    _dump(ev / "selection.json", {"candidate": "fusion", "path": "merge/fusion/final"})
    (tmp_path / "merge" / "fusion" / "final").mkdir(parents=True)
    e = stage_figures("evaluate", {"result": {}}, ev, log_models=True)
    assert ((tmp_path / "merge" / "fusion" / "final").resolve(), "models/merge-fusion") in e.artifacts

    mg = tmp_path / "merge"
    _dump(mg / "search.json", {"chosen": "ties-1", "candidates": [
        {"name": "ties-1", "label": "TIES", "steps": [], "out_at_rung": None,
         "dev": {"40": {"math": 0.6}, "10": {"math": 0.5}}, "objective": {"10": 0.5, "40": 0.6}}]})
    m = stage_figures("merge", {"result": {"candidates": {"fusion": {"mid": {"seconds": 1.5, "max_task_peak_rss_mb": 300}}}}}, mg)
    assert m.scalars["candidates/fusion/mid/max_task_peak_rss_mb"] == 300
    (c,) = m.children
    assert c.name == "search/ties-1" and c.params["chosen"] is True
    assert c.steps == {10: {"dev/math": 0.5, "objective": 0.5}, 40: {"dev/math": 0.6, "objective": 0.6}}

    rp = tmp_path / "report"
    rp.mkdir()
    for name in ("report.md", "loss.png", "notes.txt"):
        (rp / name).write_text("x")
    r = stage_figures("report", {"result": {}}, rp)
    assert sorted((p.name, d) for p, d in r.parent_artifacts) == [("loss.png", "report"), ("report.md", "report")]


class FakeBackend:
    """Records what the tracker asks for; `fail` makes every call raise (a dead server)."""
    name, target = "fake", "fake://x exp"

    def __init__(self):
        self.calls: list[tuple] = []
        self.n = 0
        self.fail = False

    def _call(self, *what):
        if self.fail:
            raise ConnectionError("connection refused\nsecond line")
        self.calls.append(what)

    def open(self, run_id, name, *, parent, kind, params, tags):
        if not run_id:
            self.n += 1
        rid = run_id or f"r{self.n}"
        self._call("open", rid, name, parent, params is not None)
        return rid

    def log_metrics(self, run_id, metrics, step):
        self._call("metrics", run_id, dict(metrics), step)

    def log_steps(self, run_id, rows):
        self._call("steps", run_id, [s for s, _ in rows])

    def log_artifacts(self, run_id, items):
        self._call("artifacts", run_id, [p.name for p, _ in items])

    def end(self, run_id, status):
        self._call("end", run_id, status == "FINISHED")

    def close(self):
        pass


def test_tracker_resumes_unfinished_runs_and_warns_once(tmp_path, warnings_seen):
    fb = FakeBackend()
    t = Tracker(fb, tmp_path, run_name="exp")
    t.finish("FINISHED")
    assert fb.calls == []  # nothing ran: no parent run either
    t = Tracker(fb, tmp_path, run_name="exp")
    t.stage_started("toy", {"seed": 0})
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "manifest.json").write_text("{}")
    t.stage_finished("toy", {"result": {"rows": 5}}, tmp_path / "toy")
    t.stage_started("train", {"lr": 1})
    h = t.child("train", "math", {"lr": 1})
    h.log({"final_loss": 0.5})
    t.finish("FAILED")  # train raised
    assert ("open", "r1", "exp", None, True) in fb.calls and ("open", "r2", "toy", "r1", True) in fb.calls
    assert ("metrics", "r2", {"rows": 5.0}, None) in fb.calls and ("artifacts", "r2", ["manifest.json"]) in fb.calls
    assert [c for c in fb.calls if c[0] == "end"] == [("end", "r2", True), ("end", "r4", False), ("end", "r3", False),
                                                      ("end", "r1", False)]
    # the rerun: the same parent, the unfinished train run and its branch continue; toy is new
    fb.calls.clear()
    t = Tracker(fb, tmp_path, run_name="exp")
    t.stage_started("train", {"lr": 1})
    assert t.child("train", "math").run_id == "r4"
    t.stage_started("toy", {"seed": 0})
    assert [c[1] for c in fb.calls if c[0] == "open"] == ["r1", "r3", "r4", "r5"]
    t.stage_started("verify", {"x": 1})  # a changed config slice would not resume either
    # the server dies: one warning line, then nothing is asked of it
    fb.fail = True
    t.child("verify", "a").log({"x": 1})
    t.stage_finished("verify", {"result": {"rows": 1}}, tmp_path)
    t.finish("FINISHED")
    assert len(warnings_seen) == 1 and "\n" not in warnings_seen[0]
    assert warnings_seen[0].startswith("tracking: fake open the verify/a run failed (ConnectionError: connection refused second")
    state = json.loads((tmp_path / "tracking.json").read_text())[fb.target]
    assert state["parent"] == "r1" and state["stages"]["toy"]["id"] == "r5"


def test_tailer_logs_each_step_once_across_restarts(tmp_path):
    fb = FakeBackend()
    prog = tmp_path / "branch-math-progress.jsonl"
    line = lambda s: json.dumps({"step": s, "loss": 1 / s, "lr": 1e-4, "tokens_per_s": 10.0}) + "\n"  # noqa: E731
    t = Tracker(fb, tmp_path, run_name="exp")
    t.stage_started("train", {})
    tail = ProgressTailer(t, "train", {"math": (prog, {"lr": 1e-4})}, poll_s=60)
    assert tail.poll() == 0  # no file yet
    prog.write_text(line(1) + line(2) + line(3)[:10])  # the third line is still being written
    assert tail.poll() == 2
    with prog.open("a") as f:
        f.write(line(3)[10:] + line(4))
    assert tail.poll() == 2
    t.finish("FAILED")  # the driver dies while the branch trains
    with prog.open("a") as f:  # the resumed branch repeats steps 3-4 from its checkpoint, then goes on
        f.write(line(3) + line(4) + line(5))
    t = Tracker(fb, tmp_path, run_name="exp")
    t.stage_started("train", {})
    tail = ProgressTailer(t, "train", {"math": (prog, {"lr": 1e-4})}, poll_s=0.05).start()
    tail.stop({"math": {"final_loss": 0.2, "loss_curve": [[1, 1.0]]}})
    assert [c[2] for c in fb.calls if c[0] == "steps"] == [[1, 2], [3, 4], [5]]
    assert ("metrics", "r3", {"total/final_loss": 0.2}, None) in fb.calls and ("end", "r3", True) in fb.calls


def test_required_tracker_fails_at_preflight_in_one_line(tmp_path):
    from rdistill.preflight import run_preflight
    from rdistill.rundir import RunDir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens there once the socket closes
    cfg = load(["stages=[toy]", f"run_dir={tmp_path}", "tracking=mlflow", f"tracking.uri=http://127.0.0.1:{dead}",
                "tracking.required=true", "tracking.retries=0", "tracking.timeout_s=5"])
    with pytest.raises(ResourceError) as e:
        run_preflight(cfg, RunDir(tmp_path), ["toy"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"tracking.required=true but mlflow at http://127.0.0.1:{dead} is unusable")
    assert msg.endswith("or set tracking.required=false to run untracked")


def test_default_is_untracked(tmp_path, monkeypatch):
    monkeypatch.setattr("rdistill.topology.init_ray", lambda rc: {})
    assert pipeline.run_pipeline(load(["stages=[toy]", f"run_dir={tmp_path}"])) == {"toy": "ran"}
    assert not (tmp_path / "tracking.json").exists()


# -- slow: the pipeline runner against real trackers ------------------------------------------

N_STEPS = 12


def _fake_world(monkeypatch, fail: dict):
    """The real runner, toy, train (its tailer), merge (its candidate runs) and report stages; cheap
    stand-ins for what needs engines, Ray or a sandbox, writing the files the real ones write."""
    from rdistill.train.sft import PreparedSFT

    def generate(ctx):
        return {"rows": 120, "completion_tokens": 9000, "completion_tokens_per_s": 150.0, "error_rows": 1,
                "error_share": 0.0083, "domains": {d: {"rows": 40} for d in DOMS}}

    def verify(ctx):
        for d in DOMS:
            (ctx.out / f"{d}.jsonl").write_text("".join(json.dumps({"messages": [], "completion_tokens": 20 + k})
                                                        + "\n" for k in range(30)))
        return {"funnel": {d: [["generated", 40], ["complete", 36], ["kept", 30]] for d in DOMS}, "kept": 90}

    def evaluate(ctx):
        _dump(ctx.out / "results.json", _results(("base", "branch:math", "merge:fusion", "merge:search")))
        _dump(ctx.out / "selection.json", {"candidate": "fusion", "path": "merge/fusion/final"})
        return {"models": 4, "samples": 480, "chosen_merge": "fusion"}

    def prepare(base, sets, out_dir, cfg, device, name, storage_dir, **kw):
        return PreparedSFT(base, out_dir, cfg, device, name, Path(storage_dir), Path(storage_dir) / "rows.npz",
                           {"kept": 30, "samples": 30, "rows": 10, "tokens": 3000, "dropped_too_long": 0,
                            "pad_id": 0}, N_STEPS)

    def fit(job):
        prog = job.storage / f"{job.name}-progress.jsonl"
        prog.parent.mkdir(parents=True, exist_ok=True)
        written = len(prog.read_text().splitlines()) if prog.exists() else 0
        for s in range(max(0, written - 2) + 1, N_STEPS + 1):  # a resume repeats 2 steps from its checkpoint
            if fail.get(job.name) == s:
                raise RuntimeError("worker died")
            with prog.open("a") as f:
                f.write(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-4, "tokens": 100, "padded": 120,
                                    "tokens_per_s": 1000.0 + s, "padding_share": 0.17}) + "\n")
            time.sleep(0.01)
        key = job.name.removeprefix("branch-")
        for _ in range(400):  # live: the driver's tailer logs the curve while the branch still trains
            st = next(iter(json.loads((job.storage.parent.parent.parent / "tracking.json").read_text()).values()))
            if st["stages"]["train"]["children"][key]["last_step"] == N_STEPS:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"{key}: the tailer did not log the curve while training")
        out = Path(job.out_dir)
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n"
                                                   for s in range(1, N_STEPS + 1)))
        return {"steps": N_STEPS, "total_steps": job.total_steps, "rows": 10, "tokens": 3000, "wall_s": 1.5,
                "first_loss": 3.0, "final_loss": 0.25, "tokens_per_s": 1234.5,
                "padding_share": 0.17, "loss_curve": [[1, 3.0], [N_STEPS, 0.25]]}

    def run_step(step, dest, resolve, opts, say):
        dest.mkdir(parents=True)
        return {"tensors": 10, "bytes_written": 4000, "seconds": 0.5, "max_task_peak_rss_mb": 321.0}

    def run_search(ctx, opts, resolve):
        (ctx.out / "search").mkdir()
        _dump(ctx.out / "search.json", {"chosen": "ties-1", "label": "TIES", "engine_starts": 1, "seconds": 2.0,
                                        "rungs": [{"dev_prompts_per_domain": 10, "candidates": 2},
                                                  {"dev_prompts_per_domain": 40, "candidates": 1}], "candidates": [
            {"name": n, "label": n, "steps": [], "out_at_rung": None if n == "ties-1" else 10,
             "dev": {"10": {d: 0.4 for d in DOMS}, **({"40": {d: 0.5 for d in DOMS}} if n == "ties-1" else {})},
             "objective": {"10": 0.4, **({"40": 0.5} if n == "ties-1" else {})}} for n in ("ties-1", "linear-2")]})
        return {"search": {"chosen": "ties-1"}, "search_candidates": 2}

    fakes = {"generate": generate, "verify": verify, "evaluate": evaluate}
    real = pipeline.stage_fn
    monkeypatch.setattr(pipeline, "stage_fn", lambda s: fakes.get(s) or real(s))
    for target, fn in [("rdistill.topology.init_ray", lambda rc: {}), ("rdistill.train.stage.init_ray", lambda rc: {}),
                       ("rdistill.scoring.sandbox_check.check_sandbox", lambda *a, **k: None),
                       ("rdistill.train.stage.prepare_sft", prepare), ("rdistill.train.stage.fit_sft", fit),
                       ("rdistill.merge.stage.run_step", run_step), ("rdistill.merge.search_run.run_search", run_search)]:
        monkeypatch.setattr(target, fn)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback (one worker, no job runner), stopped by its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "mlflow-server"
    store.mkdir()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                             "--default-artifact-root", str(store / "artifacts")],
                            stdout=open(store / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group: uvicorn's worker goes with it
    uri = f"http://127.0.0.1:{port}"
    import requests
    for _ in range(240):
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None, (store / "server.log").read_text()[-2000:]
        time.sleep(0.5)
    else:
        raise AssertionError("mlflow server did not start: " + (store / "server.log").read_text()[-2000:])

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    yield uri, stop
    stop()


@pytest.mark.slow
def test_mlflow_server_gets_one_parent_run_with_nested_stage_runs(tmp_path, monkeypatch, mlflow_server, warnings_seen):
    from mlflow import MlflowClient
    uri, stop_server = mlflow_server
    fail = {"branch-code": 6}
    _fake_world(monkeypatch, fail)
    run_dir = tmp_path / "run"
    args = [ALL, f"run_dir={run_dir}", "merge=toy_fusion", "merge.search.enabled=true", "tracking=mlflow",
            f"tracking.uri={uri}", "tracking.experiment=rdistill-test", "tracking.poll_s=0.05",
            "tracking.retries=0", "tracking.timeout_s=5"]
    with pytest.raises(RuntimeError, match="branch code failed"):
        pipeline.run_pipeline(load(args))  # a branch dies at step 6
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rdistill-test")
    failed = {r.info.run_name: r.info for r in client.search_runs([exp.experiment_id])}
    assert (failed["train"].status, failed["train/code"].status, failed["train/math"].status) == (
        "FAILED", "FAILED", "FINISHED")
    fail.clear()
    assert set(pipeline.run_pipeline(load(args)).values()) == {"skipped", "ran"}  # resumes at train
    assert warnings_seen == []

    runs = client.search_runs([exp.experiment_id], max_results=500)
    kids = lambda rid: {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == rid}  # noqa: E731
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    stages = kids(parent.info.run_id)
    assert sorted(stages) == sorted(["toy", "generate", "verify", "train", "merge", "evaluate", "report"])
    assert len([r for r in runs if r.data.tags.get("rdistill.kind") == "stage"]) == 7  # train resumed, not repeated
    assert parent.info.status == "FINISHED" and {r.info.status for r in stages.values()} == {"FINISHED"}
    train, merge, ev = stages["train"], stages["merge"], stages["evaluate"]
    assert train.info.run_id == failed["train"].run_id  # the resumed stage continued its run
    # the train section as flat params, JSON-encoded (the toy's budget is epochs; max_steps is unset)
    assert train.data.params["train.epochs"] == json.dumps(load(args).train.epochs)
    assert train.data.params["train.max_steps"] == json.dumps(load(args).train.max_steps) == "null"
    assert stages["verify"].data.metrics["funnel/science/kept"] == 30
    assert stages["generate"].data.metrics["completion_tokens_per_s"] == 150.0
    branches = kids(train.info.run_id)
    assert sorted(branches) == ["train/code", "train/math", "train/mixture", "train/science"]
    for b in branches.values():  # the whole curve, each step once, though code died and both resumed
        hist = client.get_metric_history(b.info.run_id, "loss")
        assert sorted(m.step for m in hist) == list(range(1, N_STEPS + 1))
        assert b.data.metrics["tokens_per_s"] == 1000.0 + N_STEPS and b.data.metrics["total/final_loss"] == 0.25
        assert b.data.params["lr"] == str(load(args).train.lr)
    cands = kids(merge.info.run_id)
    assert sorted(cands) == ["merge/fusion", "merge/search/linear-2", "merge/search/ties-1"]
    assert cands["merge/fusion"].data.metrics["final/max_task_peak_rss_mb"] == 321.0
    assert cands["merge/fusion"].data.metrics["mid/seconds"] == 0.5
    assert [(m.step, m.value) for m in client.get_metric_history(cands["merge/search/ties-1"].info.run_id,
                                                                 "objective")] == [(10, 0.4), (40, 0.5)]
    for m, d in [("merge:fusion", "code"), ("base", "math")]:
        assert ev.data.metrics[f"pass_at_1/{m}/{d}"] == parent.data.metrics[f"pass_at_1/{m}/{d}"] > 0
        assert ev.data.metrics[f"pass_at_1_stderr/{m}/{d}"] == 0.03
    art = lambda rid, p="": sorted(a.path for a in client.list_artifacts(rid, p))  # noqa: E731
    assert {"report/report.md", "report/loss.png", "report/accuracy.png"} <= set(art(parent.info.run_id, "report"))
    assert "config.json" in art(parent.info.run_id) and "manifests/train" in art(parent.info.run_id, "manifests")
    assert "manifest.json" in art(train.info.run_id) and "results.json" in art(ev.info.run_id)

    # a rerun that skips every stage logs nothing
    assert set(pipeline.run_pipeline(load(args)).values()) == {"skipped"}
    assert len(client.search_runs([exp.experiment_id], max_results=500)) == len(runs)

    # the server dies: the forced stage still runs and writes its output, with one warning line
    stop_server()
    before = json.loads((run_dir / "report" / "manifest.json").read_text())["finished"]
    time.sleep(1.1)
    t0 = time.time()
    assert pipeline.run_pipeline(load(args + ["force=[report]"]))["report"] == "ran"
    assert time.time() - t0 < 60
    assert json.loads((run_dir / "report" / "manifest.json").read_text())["finished"] != before
    assert len(warnings_seen) == 1 and warnings_seen[0].startswith("tracking: mlflow open the parent run failed")


def _wandb_records(path: Path) -> list:
    """Records of an offline W&B run file (the LevelDB-style log: 7-byte header, then records of
    checksum, length, type in 32 KiB blocks), for asserting what the offline run holds."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last fragment of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.slow
def test_wandb_offline_run_tree_and_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setattr("rdistill.topology.init_ray", lambda rc: {})
    # a finished run's outputs for the report (as in test_report.py), made by hand
    _dump(run_dir / "evaluate" / "results.json", _results())
    for stage, result in [("evaluate", {}), ("train", {}), ("generate", {}), ("merge", {}),
                          ("verify", {"funnel": {d: [["generated", 40], ["kept", 30]] for d in DOMS}})]:
        _dump(run_dir / stage / "manifest.json", {"fingerprint": f"{stage}-1", "result": result})
    real, calls = pipeline.stage_fn, []

    def killed(ctx):
        calls.append(1)
        raise KeyboardInterrupt  # killed mid-stage

    def stage_fn(stage):
        return killed if stage == "report" and not calls else real(stage)
    monkeypatch.setattr(pipeline, "stage_fn", stage_fn)
    args = ["stages=[toy,report]", f"run_dir={run_dir}", "tracking=wandb", "tracking.run_name=wb-test"]
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(load(args))
    first = json.loads((run_dir / "tracking.json").read_text())
    assert pipeline.run_pipeline(load(args)) == {"toy": "skipped", "report": "ran"}
    assert pipeline.run_pipeline(load(args)) == {"toy": "skipped", "report": "skipped"}
    (state,) = json.loads((run_dir / "tracking.json").read_text()).values()
    (old,) = first.values()
    assert state["parent"] == old["parent"] and state["stages"]["report"]["id"] == old["stages"]["report"]["id"]
    runs: dict[str, list] = {}
    for f in sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")):
        recs = _wandb_records(f)
        (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        runs.setdefault(run.run_id, []).append((run, recs))
    ids = {state["parent"]: 2, state["stages"]["toy"]["id"]: 1, state["stages"]["report"]["id"]: 2}
    assert {k: len(v) for k, v in runs.items()} == ids  # the parent and the killed report resumed
    (toy_run, toy_recs), = runs[state["stages"]["toy"]["id"]]
    assert (toy_run.display_name, toy_run.job_type, toy_run.run_group) == ("wb-test/toy", "stage",
                                                                          f"wb-test-{state['parent']}")
    summary = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in toy_recs if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert summary["rows/math/test"] == load(args).toy.n_test
    parent_arts = {r.artifact.type for _, recs in runs[state["parent"]] for r in recs
                   if r.WhichOneof("record_type") == "artifact"}
    assert {"report", "manifests", "files"} <= parent_arts
