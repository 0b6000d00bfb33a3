"""An unusable output folder (run_dir, a local tracking store) stops `jobs/run.py` with one line on
stderr, exit code 1, no traceback, before Ray starts, and leaves nothing half-created.

Each case is made the way it happens, as root (who ignores permission bits): a /proc path, a file
where the folder should be, a read-only or a tiny tmpfs mounted in a mount namespace of the run's
own (`unshare -m`), and a root without CAP_DAC_OVERRIDE (`setpriv`) for a folder without write
permission. "No Ray" is checked two ways: Ray's temp folder (RAY_TMPDIR, where `ray.init` makes
its session folder) stays empty, and stderr holds nothing but the error line (starting Ray logs
several lines)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from rdistill.cli.compose import load
from rdistill.errors import ResourceError
from rdistill.outputs import _local_store, check_outputs, node_sees, output_dirs

ONE_DOMAIN = ["~domains.code", "~domains.science"]
NO_CAPS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def _works(cmd: list[str]) -> bool:
    try:
        return shutil.which(cmd[0]) is not None and subprocess.run(cmd, capture_output=True).returncode == 0
    except OSError:
        return False


needs_unshare = pytest.mark.skipif(not _works(["unshare", "-m", "true"]), reason="needs unshare -m (root)")
needs_setpriv = pytest.mark.skipif(not _works([*NO_CAPS, "true"]), reason="needs setpriv (root)")


def run_cli(tmp_path: Path, args: list[str], *, shell: str | None = None, prefix: list[str] | None = None):
    """jobs/run.py as a user runs it; `shell`: a sh script around it, `{run}` marking the command."""
    ray_tmp = tmp_path / "ray_tmp"
    ray_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/run.py", *args]
    if shell is not None:
        cmd = ["unshare", "-m", "sh", "-c", shell.replace("{run}", " ".join(cmd))]
    p = subprocess.run([*(prefix or []), *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    return p, ray_tmp


def one_line(p: subprocess.CompletedProcess, ray_tmp: Path, *must: str) -> str:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    for m in must:
        assert m in lines[0], lines[0]
    assert not any(ray_tmp.iterdir()), sorted(ray_tmp.rglob("*"))[:5]  # ray.init makes ray/session_*
    return lines[0]


def test_a_run_dir_that_cannot_be_created(tmp_path):
    p, ray_tmp = run_cli(tmp_path, ["run_dir=/proc/rdistill-forbidden/run"])
    one_line(p, ray_tmp, "run_dir /proc/rdistill-forbidden/run cannot be created", "/proc/rdistill-forbidden")
    assert not os.path.lexists("/proc/rdistill-forbidden")


def test_a_file_where_the_run_dir_should_be(tmp_path):
    (tmp_path / "taken").write_text("not a folder\n")
    p, ray_tmp = run_cli(tmp_path, [f"run_dir={tmp_path / 'taken'}"])
    one_line(p, ray_tmp, f"run_dir {tmp_path / 'taken'} is a file, not a directory")
    assert (tmp_path / "taken").read_text() == "not a folder\n"


@needs_setpriv
def test_a_run_dir_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    p, ray_tmp = run_cli(tmp_path, [f"run_dir={locked}"], prefix=NO_CAPS)
    one_line(p, ray_tmp, f"run_dir {locked} is not writable (Permission denied")
    p, ray_tmp = run_cli(tmp_path, [f"run_dir={locked}/new/run"], prefix=NO_CAPS)
    one_line(p, ray_tmp, f"run_dir {locked}/new/run cannot be created: no permission to create {locked}/new")
    assert list(locked.iterdir()) == []


@needs_unshare
@pytest.mark.parametrize("sub", ["existing", "new/run"])
def test_a_run_dir_on_a_read_only_filesystem(tmp_path, sub):
    disk = tmp_path / "disk"
    disk.mkdir()
    shell = (f"mount -t tmpfs -o size=1m tmpfs {disk} && mkdir {disk}/existing && "
             f"mount -o remount,ro {disk} && exec {{run}}")
    p, ray_tmp = run_cli(tmp_path, [f"run_dir={disk}/{sub}"], shell=shell)
    one_line(p, ray_tmp, f"run_dir {disk}/{sub} is on a read-only filesystem")


@needs_unshare
def test_a_run_dir_with_less_room_than_the_estimate(tmp_path):
    """The toy run's artifacts are estimated at 20 MB (the dry run says so); the disk has 1 MB. The
    run directory's missing parents are made, then removed again when the space check fails."""
    disk, listing = tmp_path / "disk", tmp_path / "listing.txt"
    disk.mkdir()
    shell = (f"mount -t tmpfs -o size=1m tmpfs {disk} && {{run}}; rc=$?; "
             f"find {disk} -mindepth 1 > {listing}; exit $rc")
    p, ray_tmp = run_cli(tmp_path, [f"run_dir={disk}/a/b/run"], shell=shell)
    line = one_line(p, ray_tmp, f"run_dir {disk}/a/b/run has 1.0 MB free but the run needs about 20.0 MB")
    assert "larger disk" in line
    assert listing.read_text() == ""  # a, a/b and a/b/run were made by the check, and removed


def test_a_tracking_store_that_cannot_be_created_leaves_no_run_dir(tmp_path):
    """run_dir passes (and is created), the MLflow SQLite store's folder fails: run_dir goes again."""
    run_dir = tmp_path / "fresh" / "run"
    uri = "sqlite:////proc/rdistill-forbidden/mlflow.db"
    p, ray_tmp = run_cli(tmp_path, [f"run_dir={run_dir}", "tracking.backend=mlflow", f"tracking.uri={uri}"])
    one_line(p, ray_tmp, f"tracking.uri={uri} (folder /proc/rdistill-forbidden) cannot be created")
    assert not (tmp_path / "fresh").exists()


# In-process: the variants, each in milliseconds.

def cfg_of(tmp_path: Path, *overrides: str):
    return load([f"run_dir={tmp_path / 'run'}", *ONE_DOMAIN, *overrides])


def test_a_file_inside_the_run_dir_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ResourceError) as e:
        check_outputs(load([f"run_dir={tmp_path}/f/a/run", *ONE_DOMAIN]))
    assert str(e.value) == (f"run_dir {tmp_path}/f/a/run cannot be created: {tmp_path}/f is a file, not a "
                            "directory: remove it or point run_dir elsewhere")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ResourceError, match="is a link to nothing, not a directory"):
        check_outputs(load([f"run_dir={tmp_path}/gone", *ONE_DOMAIN]))


def test_failed_space_check_removes_only_what_it_made(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    cfg = load([f"run_dir={tmp_path}/a/b/c/run", *ONE_DOMAIN])
    with pytest.raises(ResourceError, match="GB free but the run needs about"):
        check_outputs(cfg, 1e18)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]
    calls = []
    check_outputs(cfg, lambda: calls.append(1) or 1.0)  # room enough: the folder is made and kept
    assert (tmp_path / "a/b/c/run").is_dir() and calls == [1]
    assert list((tmp_path / "a/b/c/run").iterdir()) == []  # the probe file is gone


def test_tracking_store_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _local_store("sqlite:////x/y/m.db?timeout=5") == (Path("/x/y/m.db"), True)
    assert _local_store("sqlite:///rel.db") == (Path("rel.db").absolute(), True)
    assert _local_store("file:///x/ml%20runs") == (Path("/x/ml runs"), False)
    assert _local_store("./mlruns") == (Path("mlruns").absolute(), False)
    for remote in ("http://host:5000", "databricks", "postgresql://u@h/db", "sqlite://"):
        assert _local_store(remote) is None, remote
    # no URI anywhere: the store lives in run_dir, which is checked anyway
    assert [w for w, _ in output_dirs(cfg_of(tmp_path, "tracking.backend=mlflow"))] == ["run_dir"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{tmp_path}/store")
    assert output_dirs(cfg_of(tmp_path, "tracking.backend=mlflow"))[1] == (
        f"MLFLOW_TRACKING_URI={tmp_path}/store", tmp_path / "store")
    (tmp_path / "m.db").mkdir()
    with pytest.raises(ResourceError, match=r"m.db is a directory, not a database file"):
        check_outputs(cfg_of(tmp_path, "tracking.backend=mlflow", f"tracking.uri=sqlite:///{tmp_path}/m.db"))
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ResourceError) as e:
        check_outputs(cfg_of(tmp_path, "tracking.backend=mlflow", f"tracking.uri=file://{tmp_path}/taken"))
    assert f"(folder {tmp_path}/taken) is a file, not a directory" in str(e.value)
    assert not (tmp_path / "run").exists()  # run_dir passed first, and was removed again
    check_outputs(cfg_of(tmp_path, "tracking.backend=mlflow", f"tracking.uri=sqlite:///{tmp_path}/new/m.db"))
    assert (tmp_path / "new").is_dir() and (tmp_path / "run").is_dir()


def test_what_a_node_sees(tmp_path):
    """The body of the per-node task (check_nodes_see): the driver's marker must be readable."""
    (tmp_path / ".m").write_text("token")
    assert node_sees(str(tmp_path), ".m", "token") is None
    assert node_sees(str(tmp_path / "absent"), ".m", "token") == "does not exist"
    assert "driver's files are not visible" in node_sees(str(tmp_path), ".m", "another token")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m"]


# Slow: a real cluster with one node whose disks differ from the driver's.

@pytest.mark.slow
@needs_unshare
def test_a_node_that_does_not_see_the_run_dir_is_named(tmp_path):
    """A head node and a second node started (`ray start`) in a mount namespace where the shared
    folder is a local, empty tmpfs: the run stops after joining, before any stage, naming that node."""
    import time

    from ray.cluster_utils import Cluster

    from rdistill.watchdog import _stop, descendants
    shared = tmp_path / "shared"
    shared.mkdir()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray_bin = Path(sys.executable).parent / "ray"
    node = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {shared} && exec {ray_bin} start "
                                      f"--address={c.address} --num-cpus=1 --block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        head = c.head_node.node_id
        deadline, others = time.time() + 120, []
        while not others and time.time() < deadline:
            others = [n for n in c.global_state._live_node_ids() if n != head]
            time.sleep(0.5)
        assert len(others) == 1, "the second node did not join"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        p = subprocess.run([sys.executable, "jobs/run.py", f"run_dir={shared}/run", f"ray.address={c.address}",
                            "stages=[toy]", *ONE_DOMAIN], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        assert p.returncode == 1, p.stderr[-3000:]
        errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, p.stderr[-3000:]
        assert f"run_dir {shared}/run does not exist on node" in errors[0] and f"(id {others[0]})" in errors[0]
        assert head not in errors[0]
        assert not (shared / "run" / "toy").exists()  # no stage ran
        assert not list((shared / "run").glob(".rdistill-*"))  # the marker is removed again
    finally:  # by pid: `ray start` shuts its node down on SIGTERM; whatever is left gets SIGKILL
        left = descendants(node.pid)
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        _stop(left)
        c.shutdown()
