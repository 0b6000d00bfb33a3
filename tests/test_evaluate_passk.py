"""pass@k estimator, standard error, aggregation of per-sample rows, merge choice, eval and train topology."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from rdistill.scoring.passk import (aggregate, mean_and_stderr, objective_score, pass_at_k,
                                     select_candidate)


def _oracle(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 2, 1), (16, 5, 1), (16, 5, 4),
                                   (10, 9, 3), (10, 0, 10), (200, 37, 10), (5, 3, 3)])
def test_pass_at_k_matches_the_binomial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_oracle(n, c, k), abs=1e-12)


def test_pass_at_1_is_the_share_correct_and_bad_input_is_refused():
    assert pass_at_k(4, 3) == 0.75
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5)


def test_stderr_is_over_prompts():
    scores = [0.25, 0.5, 1.0, 0.0, 0.75]
    mean, se = mean_and_stderr(scores)
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(statistics.stdev(scores) / math.sqrt(5))
    assert mean_and_stderr([0.5]) == (0.5, None)


def test_aggregate_per_model_and_domain_against_hand_count():
    rng = random.Random(0)
    rows, truth = [], {}
    for model in ("base", "branch:math"):
        for domain, n in (("math", 4), ("code", 2)):
            per_prompt = []
            for p in range(7):
                cs = [rng.random() < (0.3 if model == "base" else 0.7) for _ in range(n)]
                per_prompt.append(sum(cs) / n)
                rows += [{"model": model, "domain": domain, "prompt_id": f"{domain}/{p}",
                          "correct": c, "error": "timeout" if (p, i) == (0, 0) else None}
                         for i, c in enumerate(cs)]
            truth[(model, domain)] = (statistics.mean(per_prompt),
                                      statistics.stdev(per_prompt) / math.sqrt(7), n)
    res = aggregate(rows)
    assert len(res) == 4
    for r in res:
        mean, se, n = truth[(r["model"], r["domain"])]
        assert r["pass_at_1"] == pytest.approx(mean, abs=1e-6)
        assert r["stderr"] == pytest.approx(se, abs=1e-6)
        assert (r["n_prompts"], r["n_samples"], r["n_errors"]) == (7, n, 1)
        assert set(r) >= {"model", "domain", "n_prompts", "n_samples", "pass_at_1", "stderr"}


def test_selection_by_mean_or_min():
    dev = {"fusion": {"math": 0.9, "code": 0.2, "science": 0.7},   # mean 0.6, min 0.2
           "ties": {"math": 0.6, "code": 0.5, "science": 0.55}}    # mean 0.55, min 0.5
    assert select_candidate(dev, "mean") == "fusion"
    assert select_candidate(dev, "min") == "ties"
    assert objective_score(dev["ties"], "min") == 0.5
    # a tie keeps the first listed candidate
    assert select_candidate({"a": {"x": 0.5}, "b": {"x": 0.5}}, "mean") == "a"


def test_eval_concurrency_follows_cluster_and_cap():
    from rdistill.cli.compose import load
    from rdistill.topology import eval_concurrency
    cfg = load([])
    assert cfg.eval.concurrency == 1  # the toy default: one engine on a laptop
    assert eval_concurrency(cfg, {"CPU": 8}, 6) == 1
    cfg.eval.concurrency = 2
    assert eval_concurrency(cfg, {"CPU": 8}, 6) == 2
    assert eval_concurrency(cfg, {"CPU": 1}, 6) == 1  # never 0: Ray queues what does not fit
    cfg.eval.concurrency = None
    assert eval_concurrency(cfg, {"CPU": 8}, 6) == 4  # 8 CPUs / (1 engine + 4 light stages)
    assert eval_concurrency(cfg, {"CPU": 64}, 3) == 3
    cfg.device = "gpu"
    assert eval_concurrency(cfg, {"CPU": 64, "GPU": 2}, 6) == 2


def test_run_at_most_bounds_concurrency_keeps_order_and_raises():
    import threading
    import time

    from rdistill.parallel import run_at_most
    live, peak, lock, ran = [0], [0], threading.Lock(), []

    def job(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        ran.append(i)
        return i * i

    assert run_at_most(2, [lambda i=i: job(i) for i in range(6)]) == [0, 1, 4, 9, 16, 25]
    assert peak[0] == 2

    def bad():
        time.sleep(0.01)
        raise RuntimeError("engine failed")
    ran.clear()
    with pytest.raises(RuntimeError, match="engine failed"):  # fail fast: no job starts after it
        run_at_most(1, [lambda: job(1), bad, lambda: job(2)])
    assert ran == [1]
    ran.clear()
    with pytest.raises(RuntimeError, match="engine failed"):  # every job runs, then the error
        run_at_most(1, [lambda: job(1), bad, lambda: job(2)], fail_fast=False)
    assert ran == [1, 2]


def test_trainings_at_once_are_what_the_cores_hold_on_cpus(monkeypatch):
    """On CPUs the train stage runs as many trainings at once as the nodes' cores hold (Ray's
    logical CPUs are set above them); on GPUs Ray's resources decide; train.concurrent wins."""
    import dataclasses

    from rdistill import topology
    from rdistill.config import TrainConfig
    tc = TrainConfig(num_workers=2, cpus_per_worker=1.0)
    monkeypatch.setattr(topology, "cluster_cores", lambda: 2)
    assert topology.train_concurrency("cpu", tc, 4) == 1
    monkeypatch.setattr(topology, "cluster_cores", lambda: 16)
    assert topology.train_concurrency("cpu", tc, 4) == 4 and topology.train_concurrency("cpu", tc, 3) == 3
    monkeypatch.setattr(topology, "cluster_cores", lambda: 6)
    assert topology.train_concurrency("cpu", tc, 4) == 3
    assert topology.train_concurrency("gpu", tc, 4) == 4
    assert topology.train_concurrency("cpu", dataclasses.replace(tc, concurrent=2), 4) == 2
    assert topology.train_concurrency("cpu", dataclasses.replace(tc, concurrent=8), 4) == 4


def test_run_at_most_within_a_budget_admits_jobs_by_their_costs():
    """The merge's memory budget: a job starts only when its cost fits beside those running;
    one job runs alone whatever its cost (the planner sized it)."""
    import threading
    import time

    from rdistill.parallel import run_at_most
    lock, running, seen = threading.Lock(), {}, []

    def job(i: int, cost: int) -> int:
        with lock:
            running[i] = cost
            seen.append(sum(running.values()))
        time.sleep(0.05)
        with lock:
            del running[i]
        return i

    costs = [6, 6, 3, 3, 3, 20, 1]
    out = run_at_most(4, [lambda i=i, c=c: job(i, c) for i, c in enumerate(costs)], costs=costs, budget=10)
    assert out == list(range(7))
    assert all(s <= 10 or s == 20 for s in seen) and 20 in seen  # within the budget; the big one alone
    assert 9 in seen  # three of cost 3 ran together: the budget, not one at a time, bounds them
