"""The toy world without engines: generators' answers (checked by the project's verifiers),
disjoint deterministic splits, the toy stage's files, and the shipped models' kind."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from rdistill.toy.domains import DOMAINS, SPLITS, problems, records, split_of, traces
from rdistill.scoring.verifiers import score


def _problems(domain, split="test", n=30, seed=0):
    return list(itertools.islice(problems(domain, split, seed), n))


@pytest.mark.parametrize("domain", DOMAINS)
def test_reference_answers_pass_the_verifiers(domain):
    """The correct trace of each problem is judged correct by the verify stage's scorer, and a
    wrong answer is judged wrong (so the gold is not vacuous)."""
    for p in _problems(domain, n=12):
        rec = {"gold": p.gold, "tests": p.tests, "entry_point": p.entry_point}
        v = score(domain, p.completion, rec)
        assert v.correct, (p.prompt, p.completion, v)
        assert p.completion.startswith("<think>") and "</think>" in p.completion
    p = _problems(domain, n=1)[0]
    if domain == "math":
        wrong = p.completion.replace(f"{{{p.gold}}}", f"{{{int(p.gold) + 1}}}")
    elif domain == "science":
        nxt = "ABCD"[("ABCD".index(p.gold) + 1) % 4]
        wrong = p.completion.replace(f"Answer: {p.gold}", f"Answer: {nxt}")
    else:
        wrong = p.completion.replace("return ", "return 1 + ")
    assert not score(domain, wrong, {"gold": p.gold, "tests": p.tests, "entry_point": p.entry_point}).correct


def test_golds_match_an_independent_oracle():
    for p in _problems("math", n=50):
        a, b = map(int, re.findall(r"\d+", p.prompt))
        assert p.gold == str(a + b)
    for p in _problems("science", n=50):
        opts = re.findall(r"([A-D])\) (\d+) (\w+)", p.prompt)
        val = {k: int(v) * (1000 if u in ("km", "kg", "L") else 1) for k, v, u in opts}
        want = max if re.search(r"longest|heaviest|largest", p.prompt) else min
        assert len(set(val.values())) == 4 and p.gold == want(val, key=val.get)
    for p in _problems("code", n=50):
        ns: dict = {}
        exec(p.gold + "\n" + p.tests, ns)  # the reference solution passes its hidden tests
        assert p.entry_point in ns


def test_splits_are_disjoint_unique_and_deterministic():
    seen_ids = set()
    for d in DOMAINS:
        by_split = {s: records(d, s, {"train": 300, "dev": 40, "test": 100}[s], seed=0) for s in SPLITS}
        keys = {s: {split_of(d, _key(d, r)) for r in rs} for s, rs in by_split.items()}
        for s, rs in by_split.items():
            assert keys[s] == {s}  # every record's underlying problem hashes to its own split
            assert len({r["prompt"] for r in rs}) == len(rs)
            for r in rs:
                assert set(r) == {"id", "domain", "prompt", "gold", "tests", "entry_point"}
                assert r["domain"] == d and r["id"] not in seen_ids
                seen_ids.add(r["id"])
        assert not {r["prompt"] for r in by_split["test"]} & {r["prompt"] for r in by_split["train"]}
        assert records(d, "test", 20, seed=0) == by_split["test"][:20]
        assert records(d, "test", 20, seed=1) != by_split["test"][:20]
        # the teacher's pretraining traces never contain a dev or test problem
        for t in traces(d, 300, seed=1):
            assert split_of(d, _key(d, {"prompt": t["messages"][0]["content"], "domain": d})) == "train"


def _key(domain: str, rec: dict) -> str:
    """Recover a problem's split key from its prompt alone (an independent re-derivation)."""
    p = rec["prompt"]
    if domain == "math":
        a, b = re.findall(r"\d+", p)
        return f"{int(a)}+{int(b)}"
    if domain == "science":
        from rdistill.toy.domains import QUANTITIES
        big = next(q[0] for q in QUANTITIES if re.search(rf"\d {q[0]}\b|\d {q[1]}\b", p))
        want_max = int(bool(re.search(r"longest|heaviest|largest", p)))
        return f"{big}|{want_max}|" + ",".join(re.findall(r"[A-D]\) (\d+ \w+)", p))
    from rdistill.toy.domains import CODE_OPS
    words = re.search(r"that (.*)\.$", p).group(1).split(" and then ")
    parts = []
    for i, w in enumerate(words):
        for o, (pattern, _, _) in enumerate(CODE_OPS):
            m = re.fullmatch(re.escape(pattern).replace(r"\{k\}", r"(\d)").replace(r"\{t\}", r"(?:x|the result)"), w)
            if m:
                parts.append(f"{o}:{m.group(1)}")
    assert len(parts) == len(words), p
    return "|".join(parts)


def test_toy_stage_writes_data_and_models(tmp_path):
    from rdistill.config import ExperimentConfig, ToyConfig, validated
    from rdistill.config.models import DomainConfig, SourceConfig
    from rdistill.pipeline import run_pipeline
    from rdistill.rundir import RunDir
    cfg = validated(ExperimentConfig(
        run_dir=str(tmp_path / "run"), stages=["toy"], toy=ToyConfig(n_train=30, n_dev=5, n_test=10),
        domains={d: DomainConfig(kind=d, train=SourceConfig(path=f"toy:{d}/train")) for d in DOMAINS}))
    assert run_pipeline(cfg) == {"toy": "ran"}
    run = RunDir(cfg.run_dir)
    m = run.manifest("toy")["result"]
    assert m["models"] == "shipped" and m["rows"] == 3 * 45
    for d in DOMAINS:
        rows = [json.loads(x) for x in (run.stage_dir("toy") / "data" / d / "test.jsonl").read_text().splitlines()]
        assert len(rows) == 10 and rows == records(d, "test", 10, seed=0)
    for name in ("teacher", "base"):
        mdir = run.stage_dir("toy") / "models" / name
        assert (mdir / "model.safetensors").exists() and (mdir / "generation_config.json").exists()
    assert run_pipeline(cfg) == {"toy": "skipped"}  # current manifest: not rebuilt


def test_slipped_traces_are_wrong_and_the_rest_right():
    """The base's data: a share of each domain's traces carry one slip to a wrong answer; the
    problems are the teacher's (the slip never changes which problem is drawn)."""
    from rdistill.scoring.verifiers import score
    from rdistill.toy.domains import DOMAINS, problems, traces
    for d in DOMAINS:
        probs = {p.prompt: p for p in __import__("itertools").islice(problems(d, "train", 5, unique=False), 200)}
        clean, slipped = traces(d, 200, 5), traces(d, 200, 5, slip_rate=0.5)
        assert [r["messages"][0] for r in clean] == [r["messages"][0] for r in slipped]
        wrong = 0
        for r in slipped:
            p = probs[r["messages"][0]["content"]]
            rec = {"gold": p.gold, "tests": p.tests, "entry_point": p.entry_point}
            ok = score(d, r["messages"][1]["content"], rec).correct
            assert ok == (r["messages"][1]["content"] == p.completion)
            wrong += not ok
        assert 70 <= wrong <= 130, (d, wrong)
