"""A multi-node run, simulated on this machine with `ray.cluster_utils.Cluster`: a head without
CPUs (so that no work can hide on the driver's node) and three worker nodes. The toy pipeline runs
from toy to merge through the real stack; Ray's state API then shows where the work ran:
generation and verification spread over several nodes, each branch's training workers placed by
Ray, merge tasks spread over nodes, and every artifact on the shared run directory."""

from __future__ import annotations

import json

import pytest

from rdistill.cli.compose import load

pytestmark = pytest.mark.slow

WORKER_NODES = 3
STAGES = ["toy", "generate", "verify", "train", "merge"]
SMALL = ["toy.n_train=24", "toy.n_dev=4", "toy.n_test=4", "generate.sampling.n=1", "teacher.replicas=2",
         "train.epochs=1", "train.num_workers=1",
         # where merge tasks land is the question, not which merge wins: the Fusion chain alone,
         # without the default's search (engines scoring dev) or the mixture baseline's training
         "merge=toy_fusion", "train.mixture_baseline=false"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster
    was_up = ray.is_initialized()
    if was_up:  # the session's local cluster: this test needs a driver on the simulated one
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
    for _ in range(WORKER_NODES):
        c.add_node(num_cpus=4)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if was_up:  # later tests expect the session's cluster (conftest.ray_cluster)
            from rdistill.config import RayConfig
            from rdistill.topology import init_ray
            init_ray(RayConfig(num_cpus=8))


def _nodes_of(kind: str, name_part: str) -> set[str]:
    """Node ids of every task or actor (alive or finished) whose name contains `name_part`."""
    from ray.util.state import list_actors, list_tasks
    if kind == "actor":
        rows = list_actors(limit=10_000, detail=True, raise_on_missing_output=False)
        return {a.node_id for a in rows if name_part in a.class_name and a.node_id}
    rows = list_tasks(limit=10_000, detail=True, raise_on_missing_output=False)
    return {t.node_id for t in rows if name_part in t.name and t.node_id}


def test_pipeline_spreads_over_a_simulated_multi_node_cluster(cluster, tmp_path):
    import ray

    from rdistill.pipeline import run_pipeline
    head = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU", 0) == 0)
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - {head}
    assert len(workers) == WORKER_NODES

    cfg = load([f"run_dir={tmp_path}/run", f"stages=[{','.join(STAGES)}]", *SMALL])
    assert run_pipeline(cfg) == {s: "ran" for s in STAGES}

    # Generation: the vLLM engine replicas and the Ray Data map tasks around them; verification:
    # the per-block checks (Ray Data spreads its tasks over the nodes).
    gen = _nodes_of("actor", "vLLMEngineStageUDF") | _nodes_of("task", "ChatTemplate") \
        | _nodes_of("task", "Tokenize")
    verify = _nodes_of("task", "check_frame")
    train = _nodes_of("actor", "RayTrainWorker")
    merge = _nodes_of("task", "merge_unit")
    print({k: len(v) for k, v in dict(gen=gen, verify=verify, train=train, merge=merge).items()})
    for what, nodes in dict(gen=gen, verify=verify, train=train, merge=merge).items():
        assert nodes and nodes <= workers, (what, nodes)  # never on the CPU-less head
    assert len(gen) >= 2 and len(verify) >= 2 and len(merge) >= 2
    assert len(train) >= 1

    # Every artifact is on the shared run directory, whichever node wrote it.
    run = tmp_path / "run"
    funnel = json.loads((run / "verify" / "manifest.json").read_text())["result"]["funnel"]
    for d in ("math", "code", "science"):
        assert dict(funnel[d])["generated"] == 24
        assert list((run / "train" / d).glob("*.safetensors"))
    assert list((run / "merge" / "fusion" / "final").glob("*.safetensors"))
