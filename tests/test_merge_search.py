"""The merge search: its candidate space and successive halving (fast, with planted scores),
then the real thing on small models: merged by the streaming merge, scored on dev by warm vLLM
engines, resumed after a kill without re-scoring, and refused up front for mismatched models."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from rdistill.config import MergeSearchConfig
from rdistill.merge.search import Candidate, _label, _weighted, candidate_space, neighbours, refine, rungs, successive_halving

DOMS = ["math", "code", "science"]


def test_candidate_space_covers_every_fusion_order_and_stays_within_budget():
    cands = candidate_space(DOMS, MergeSearchConfig(candidates=24))
    labels = [c.label for c in cands]
    assert len(cands) == 24 and len(set(labels)) == 24
    fusion = [c for c in cands if c.label.startswith("arcee_fusion")]
    assert len(fusion) == 6  # 3! orders
    ref = next(c for c in fusion if c.label == "arcee_fusion chain science <- math <- code")
    assert [(s["merge_method"], s["base_model"], [m["model"] for m in s["models"]]) for s in ref.steps] == [
        ("arcee_fusion", "branch:science", ["branch:math"]), ("arcee_fusion", "branch:code", ["merge:mid1"])]
    assert any(c.label == "model_stock" for c in cands) and any(c.label.startswith("linear") for c in cands)
    assert sum(c.label.startswith("task_arithmetic") for c in cands) >= 4
    assert [c.label for c in candidate_space(DOMS, MergeSearchConfig(candidates=24))] == labels  # seeded


def test_layer_groups_draw_a_gradient_per_branch_that_the_plan_applies_layer_by_layer():
    from rdistill.merge.plan import step_from_dict, tensor_parameters
    sc = MergeSearchConfig(candidates=24, layer_groups=2, weights=[0.7, 1.0, 1.3],
                           methods=["task_arithmetic", "dare_ties", "regmean", "tsv_m"])
    cands = candidate_space(DOMS, sc)
    labels = [c.label for c in cands]
    assert len(set(labels)) == 24
    drawn = [c for c in cands if any(isinstance(m["parameters"]["weight"], list) for m in c.steps[0]["models"])]
    assert len(drawn) >= 10 and {c.steps[0]["merge_method"] for c in drawn} == set(sc.methods)
    for c in drawn:
        ws = [m["parameters"]["weight"] for m in c.steps[0]["models"]]
        # two groups per branch, a gradient only where they differ; the label reads first>last
        assert all(isinstance(w, float) or (len(w) == 2 and w[0] != w[1]) for w in ws), ws
        assert c.label.count(">") == sum(isinstance(w, list) for w in ws)
    # the first layer takes the first group's weight, the last the second's, a middle one between
    ta = next(c for c in drawn if c.steps[0]["merge_method"] == "task_arithmetic")
    step = step_from_dict(dict(ta.steps[0]), name="final")
    ws = [m["parameters"]["weight"] for m in ta.steps[0]["models"]]
    for layer, t in ((0, 0.0), (3, 1.0), (1, 1 / 3)):
        _, per = tensor_parameters(step, f"model.layers.{layer}.mlp.up_proj.weight", num_layers=4)
        want = [w if isinstance(w, float) else w[0] + t * (w[1] - w[0]) for w in ws]
        assert [p["weight"] for p in per] == pytest.approx(want)
    # one group: the draws are the one-weight recipes, as before
    assert [c.label for c in candidate_space(DOMS, MergeSearchConfig(candidates=24, layer_groups=1))] == \
        [c.label for c in candidate_space(DOMS, MergeSearchConfig(candidates=24))]


def test_neighbours_of_a_gradient_move_one_layer_group_a_step():
    sc = MergeSearchConfig(weights=[0.7, 1.0, 1.3], layer_groups=2)
    c = _ta("c09", [[0.7, 1.3], 1.0, 1.0])
    near = [x.label for x in neighbours(c, sc, 0, set())]
    assert near == ["task_arithmetic w=1>1.3/1/1", "task_arithmetic w=0.7>1/1/1", "task_arithmetic w=0.7>1.3/1.3/1",
                    "task_arithmetic w=0.7>1.3/0.7/1", "task_arithmetic w=0.7>1.3/1/1.3",
                    "task_arithmetic w=0.7>1.3/1/0.7"]


def test_rungs_shrink_candidates_and_grow_prompts():
    assert rungs(24, 40, 10, 3) == [(10, 24), (30, 8), (40, 3)]
    assert rungs(5, 8, 10, 3) == [(8, 5)]


def test_halving_finds_a_planted_best_among_noisy_decoys_and_respects_the_floor():
    sc = MergeSearchConfig(candidates=27, first_prompts=5, eta=3)
    cands = [Candidate(f"c{i:02d}", f"decoy {i}", []) for i in range(27)]
    truth = {c.name: {d: 0.5 + 0.01 * i for d in DOMS} for i, c in enumerate(cands)}
    truth["c07"] = {d: 0.9 for d in DOMS}                       # the planted best
    truth["c26"] = {"math": 0.99, "code": 0.99, "science": 0.1}  # best mean, but below the base on science
    rng = random.Random(0)
    calls = []

    def score(alive, k):  # noise shrinks as more prompts are used
        calls.append((k, len(alive)))
        return {c.name: {d: v + rng.gauss(0, 0.1 / k ** 0.5) for d, v in truth[c.name].items()} for c in alive}
    mean = lambda s: sum(s.values()) / len(s)  # noqa: E731
    chosen = successive_halving(cands, 45, sc, score, mean, floor=lambda k: {d: 0.3 for d in DOMS})
    assert chosen.name == "c07" and chosen.out_at is None
    assert calls == [(5, 27), (15, 9), (45, 3)]
    assert cands[26].out_at is not None
    assert sum(c.out_at is None for c in cands) == 1


def _ta(name: str, ws: list) -> Candidate:
    return Candidate(name, _label("task_arithmetic", ws, 0.5, 1.0),
                     _weighted("task_arithmetic", [f"branch:{d}" for d in DOMS], ws, 0.5, 1.0))


def test_neighbours_move_one_branch_weight_a_step_and_skip_what_was_seen():
    sc = MergeSearchConfig(weights=[0.5, 0.7, 0.85, 1.0])
    seen = {"task_arithmetic w=1/0.85/0.85"}
    near = neighbours(_ta("c14", [0.85, 0.85, 0.85]), sc, 0, seen)
    assert [c.label for c in near] == ["task_arithmetic w=0.7/0.85/0.85", "task_arithmetic w=0.85/1/0.85",
                                       "task_arithmetic w=0.85/0.7/0.85", "task_arithmetic w=0.85/0.85/1",
                                       "task_arithmetic w=0.85/0.85/0.7"]
    assert [c.name for c in near] == ["r00", "r01", "r02", "r03", "r04"] and all(c.refined_from == "c14" for c in near)
    assert [m["parameters"]["weight"] for m in near[3].steps[0]["models"]] == [0.85, 0.85, 1.0]
    assert neighbours(_ta("c14", [0.85, 0.85, 0.85]), sc, 0, seen) == []  # all seen now
    top = [c.label for c in neighbours(_ta("c17", [1.0, 1.0, 0.5]), sc, 0, set())]
    assert top == ["task_arithmetic w=0.85/1/0.5", "task_arithmetic w=1/0.85/0.5", "task_arithmetic w=1/1/0.7"]
    fusion = next(c for c in candidate_space(DOMS, sc) if c.label.startswith("arcee_fusion"))
    assert neighbours(fusion, sc, 0, set()) == []  # not a weighted recipe
    # TIES divides by the weights' sum: a step that only rescales all weights is the same recipe
    ties = Candidate("c09", "ties", _weighted("ties", [f"branch:{d}" for d in DOMS], [0.5, 1.0, 1.0], 0.7, 1.0))
    assert [c.label for c in neighbours(ties, sc, 3, set())] == [
        "ties w=0.7/1/1 density=0.7 lambda=1", "ties w=0.5/0.85/1 density=0.7 lambda=1",
        "ties w=0.5/1/0.85 density=0.7 lambda=1"]


def test_refinement_climbs_to_the_planted_weights_and_respects_the_floor():
    """Dev scores planted as a function of the weights: science is best at weight 1.2; a math
    weight above 1.0 has the best mean but puts math below the base. The refinement climbs step by
    step, never takes that step (it does without the floor), and stops when no neighbour wins."""
    sc = MergeSearchConfig(weights=[0.5, 0.7, 0.85, 1.0, 1.2, 1.4], refine_rounds=5)

    def truth(c):
        w = dict(zip(DOMS, (m["parameters"]["weight"] for m in c.steps[0]["models"])))
        big = w["math"] > 1.0
        return {"math": 0.3 if big else 0.9 + 0.05 * w["math"], "code": 0.9,
                "science": 0.9 - (w["science"] - 1.2) ** 2 + (0.9 if big else 0)}
    calls = []

    def score(alive, k):
        calls.append((k, [c.name for c in alive]))
        return {c.name: truth(c) for c in alive}
    start = _ta("c14", [0.85, 0.85, 0.85])
    cands = [start]
    mean = lambda s: sum(s.values()) / len(s)  # noqa: E731
    chosen = refine(start, cands, 40, sc, score, mean, floor=lambda k: {d: 0.6 for d in DOMS})
    assert chosen.label == "task_arithmetic w=1/0.85/1.2"
    assert all(k == 40 for k, _ in calls) and len(calls) == 4  # 3 rounds that moved, 1 that did not
    assert calls[0][1] == ["c14", "r00", "r01", "r02", "r03", "r04", "r05"]
    assert chosen.out_at is None and start.out_at is not None
    assert sum(c.out_at is None for c in cands) == 1 and len({c.name for c in cands}) == len(cands)
    below = next(c for c in cands if c.label == "task_arithmetic w=1.2/0.85/1.2")  # scored, lost on the floor
    assert mean(below.scores[40]) > mean(chosen.scores[40]) and below.out_at is not None
    assert refine(_ta("c14", [0.85, 0.85, 0.85]), [], 40, sc, score, mean).label.startswith("task_arithmetic w=1.2/")
    assert refine(start, [start], 40, MergeSearchConfig(refine_rounds=0), score, mean) is start


@pytest.fixture(scope="module")
def search_run(ray_cluster, tmp_path_factory):
    """A run directory whose three 'branches' are the toy teacher and whose base is the toy base:
    task arithmetic with weights summing to 1 rebuilds the teacher exactly, the planted best."""
    from rdistill.cli.compose import load
    from rdistill.toy.build import ASSETS
    from rdistill.toy.stage import write_data
    root = tmp_path_factory.mktemp("search")
    cfg = load([f"run_dir={root}", "stages=[merge]", "merge.candidates=[]", "merge.search.methods=[task_arithmetic]",
                "merge.search.weights=[0.1,0.3333333333,0.6]", "merge.search.candidates=8", "merge.search.first_prompts=6",
                "merge.search.samples=1", "merge.search.eta=3", "merge.search.refine_rounds=1", "toy.n_dev=12",
                "eval.sampling.max_tokens=96",
                "student.base=" + str(ASSETS / "base")])
    write_data(root / "toy" / "data", cfg.toy)
    (root / "toy" / "manifest.json").write_text(json.dumps({"fingerprint": "toy"}))
    for d in DOMS:
        shutil.copytree(ASSETS / "teacher", root / "train" / d)
    (root / "train" / "manifest.json").write_text(json.dumps({"fingerprint": "train"}))
    return cfg, root


@pytest.mark.slow
def test_search_on_small_models_finds_the_planted_best_then_resumes_without_rescoring(search_run, monkeypatch):
    from rdistill import pipeline
    from rdistill.merge import search_run as sr
    from rdistill.rundir import RunDir
    from rdistill.scoring import answers
    cfg, root = search_run
    run = RunDir(root)
    real_halving, real_answer, real_step = sr.successive_halving, answers.answer_and_score, sr.run_step

    class Killed(Exception):
        pass

    def halving_killed_at_rung_2(cands, n_dev, sc, score, objective, floor):
        def score_then_die(alive, k):
            if k > sc.first_prompts:
                raise Killed()
            return score(alive, k)
        return real_halving(cands, n_dev, sc, score_then_die, objective, floor)
    monkeypatch.setattr(sr, "successive_halving", halving_killed_at_rung_2)
    with pytest.raises(Killed):
        pipeline.run_stage(cfg, run, "merge")
    monkeypatch.setattr(sr, "successive_halving", real_halving)

    scored, merged = [], []
    monkeypatch.setattr(answers, "answer_and_score",
                        lambda pool, items, sbx: (scored.extend((s.name, len(r)) for s, r in items),
                                                  real_answer(pool, items, sbx))[1])
    monkeypatch.setattr(sr, "run_step", lambda *a, **k: (merged.append(a[0].name), real_step(*a, **k))[1])
    res = pipeline.run_stage(cfg, run, "merge")["result"]
    # resumed: no halving candidate merged again, and only the prompts of the later rungs were
    # scored; then the refinement's 4 neighbours (one branch's weight a step up or down the grid,
    # less the 2 recipes the halving had) merged and scored on the whole dev split, none of them
    # better than the planted best
    report = json.loads((root / "merge" / "search.json").read_text())
    assert merged == ["final"] * 4
    halving = [(n, k) for n, k in scored if not n.startswith("r")]
    assert halving and all(k == 3 * (12 - 6) for _, k in halving), scored  # 3 domains x 6 new prompts x 1 sample
    assert sorted(n for n, _ in scored if n.startswith("r")) == report["refined"] == ["r00", "r01", "r02", "r03"]
    assert all(k == 3 * 12 for n, k in scored if n.startswith("r"))
    assert res["search_candidates"] == 12 and len(report["candidates"]) == 12
    assert all(c["out_at_rung"] is not None and c["refined_from"] == report["chosen"]
               for c in report["candidates"] if c["name"] in report["refined"])
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    weights = [m["parameters"]["weight"] for m in chosen["steps"][0]["models"]]
    assert weights == pytest.approx([1 / 3] * 3, rel=1e-6), chosen["label"]
    assert chosen["dev"]["12"]["math"] > report["base_dev"]["math"]
    assert res["search"]["engine_starts"] <= 2  # every candidate and the base on the same engines
    assert (root / "merge" / "search" / "final" / "config.json").exists()
    assert "task_arithmetic" in (root / "merge" / "search" / "recipe.yaml").read_text()
    assert [p.name for p in (root / "merge" / "search").iterdir() if p.is_dir()] == ["final"]


def test_search_refuses_mismatched_models_before_any_work(tmp_path):
    from rdistill.merge.search_run import check_family
    from rdistill.toy.model import tiny_test_model
    a, b = tiny_test_model(tmp_path / "a"), tiny_test_model(tmp_path / "b", num_hidden_layers=2)
    from rdistill.errors import ConfigError
    with pytest.raises(ConfigError, match="branch:code .* differs from the student base"):
        check_family({"base": str(a), "branch:math": str(a), "branch:code": str(b)})
