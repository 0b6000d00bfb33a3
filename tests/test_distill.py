"""On-policy distillation without engines: the policy-gradient loss against autograd of its
formula on full logits, rows with advantage columns packed and read back, advantages aligned
with the tokens they score, and bad inputs refused in one line before any work."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rdistill.config import ConfigError
from rdistill.data.packing import PackedRows, build_rows, save_token_rows
from rdistill.data.sft import IGNORE
from rdistill.distill.rounds import advantages, round_rows, token_sample
from rdistill.toy.build import ASSETS
from rdistill.train.forward import policy_gradient_sum


def _scored(p: int, c: int, seed: int, domain: str = "math") -> dict:
    rng = np.random.default_rng(seed)
    return {"id": f"s{seed}", "domain": domain, "prompt_ids": rng.integers(3, 500, p).tolist(),
            "completion_ids": rng.integers(3, 500, c).tolist(), "sampled_logprobs": (-rng.random(c)).tolist(),
            "student_logprobs": (-rng.random(c) * 2).tolist(), "teacher_logprobs": (-rng.random(c) * 2).tolist(),
            "finish_reason": "stop"}


def test_token_sample_aligns_advantages_with_the_tokens_they_score():
    s = _scored(5, 4, 0)
    t = token_sample(s)
    ids, tgt = t["ids"].tolist(), t["targets"].tolist()
    assert ids == s["prompt_ids"] + s["completion_ids"]
    assert tgt == [IGNORE] * 4 + s["completion_ids"] + [IGNORE]
    a = np.array(s["teacher_logprobs"], np.float32) - np.array(s["student_logprobs"], np.float32)
    np.testing.assert_array_equal(t["advantages"][4:8], a)
    np.testing.assert_array_equal(advantages(s), a)
    np.testing.assert_array_equal(t["old_logprobs"][4:8], np.float32(s["student_logprobs"]))
    assert not t["advantages"][:4].any() and t["advantages"][8] == 0


def test_rows_with_advantages_pack_and_read_back(tmp_path):
    samples = [token_sample(_scored(6, 10 + i, i)) for i in range(7)]
    rows = build_rows([len(s["ids"]) for s in samples], 48, True)
    save_token_rows(tmp_path / "rows", samples, rows)
    pr = PackedRows(tmp_path / "rows")
    assert set(pr.floats) == {"advantages", "old_logprobs"} and len(pr) == len(rows)
    for r, members in enumerate(rows):
        b = pr.batch([r], pad_id=0)
        want = np.concatenate([samples[i]["advantages"] for i in members])
        np.testing.assert_array_equal(b["advantages"][0, :len(want)].numpy(), want)
        assert (b["advantages"][0, len(want):] == 0).all()
        tg = np.concatenate([samples[i]["targets"] for i in members])
        assert b["targets"][0, :len(tg)].tolist() == tg.tolist()
    # rows without the columns (SFT) read as before
    shutil.rmtree(tmp_path / "rows" / "advantages.npy", ignore_errors=True)
    (tmp_path / "rows" / "advantages.npy").unlink()
    (tmp_path / "rows" / "old_logprobs.npy").unlink()
    assert "advantages" not in PackedRows(tmp_path / "rows").batch([0], pad_id=0)


def _batch(model, seed: int, zero: bool = False, T: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, T), generator=g)
    tgt = torch.full((2, T), IGNORE)
    tgt[:, 6:T - 1] = ids[:, 7:]
    adv = torch.zeros(2, T) if zero else torch.randn(2, T, generator=g) * (tgt != IGNORE)
    old = -torch.rand(2, T, generator=g) * 3 * (tgt != IGNORE)
    return {"input_ids": ids, "position_ids": torch.arange(T).expand(2, T), "targets": tgt, "advantages": adv,
            "old_logprobs": old}


@pytest.mark.parametrize("chunk,temperature,clip", [(0, 1.0, 0.0), (7, 1.0, 0.0), (7, 0.6, 0.0), (0, 0.6, 0.2),
                                                    (7, 1.0, 0.2)])
def test_policy_gradient_loss_matches_its_formula_on_full_logits(chunk, temperature, clip):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "base", dtype=torch.float32)
    b = _batch(model, 1)
    loss = policy_gradient_sum(model, b, chunk, temperature, clip)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits.float() / temperature
    lp = torch.log_softmax(logits, -1)
    mask = b["targets"] != IGNORE
    tok = lp.gather(-1, b["targets"].clamp(min=0)[..., None])[..., 0]
    ratio = torch.exp(tok - b["old_logprobs"])
    gain = b["advantages"] * ratio
    if clip:
        gain = torch.minimum(gain, b["advantages"] * ratio.clamp(1 - clip, 1 + clip))
        assert ((ratio - 1).abs()[mask] > clip).any()  # the case clips some tokens
    want = -(gain * mask).sum()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-4 * max(1.0, abs(want.item()))
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=2e-5, rtol=1e-3)


def test_zero_advantage_gives_exactly_zero_gradient():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "base", dtype=torch.float32)
    policy_gradient_sum(model, _batch(model, 2, zero=True), 7).backward()
    assert all((p.grad == 0).all() for p in model.parameters() if p.grad is not None)


def test_round_rows_cycle_prompts_and_seed_by_round():
    prompts = {"math": [{"id": str(i), "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(5)]}
    r0, r1 = round_rows(prompts, 0, 3, 2, 0), round_rows(prompts, 1, 3, 2, 0)
    assert len(r0) == 6 and [r["messages"][0]["content"] for r in r1[::2]] == ["q3", "q4", "q0"]
    assert len({r["seed"] for r in r0 + r1}) == 12


# ---- bad inputs: one line, before any work --------------------------------------------------

def _cfg(tmp_path, *over):
    from rdistill.cli.compose import load
    return load([f"run_dir={tmp_path}", "stages=[toy,generate,verify,train,merge,distill,evaluate,report]", *over])


def test_a_domain_without_a_teacher_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"distill.teachers.science.*every domain needs a teacher") as e:
        _cfg(tmp_path, "+distill.teachers.math=branch:math", "+distill.teachers.code=branch:code")
    assert "\n" not in str(e.value)


def _check(tmp_path, cfg, student, refs):
    from rdistill.distill.checks import check_teachers
    from rdistill.refs import resolve_model
    from rdistill.rundir import RunDir
    return check_teachers(cfg, student, lambda r: refs.get(r) or resolve_model(r, RunDir(tmp_path)))


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    from rdistill.toy.model import tiny_test_model
    other = tiny_test_model(tmp_path / "other")
    cfg = _cfg(tmp_path, f"+distill.teachers.math={ASSETS / 'teacher'}", f"+distill.teachers.code={ASSETS / 'teacher'}",
               f"+distill.teachers.science={other}")
    with pytest.raises(ConfigError, match=r"distill.teachers.science=.*tokenizer differs") as e:
        _check(tmp_path, cfg, str(ASSETS / "base"), {})
    assert "\n" not in str(e.value)
    ok = _cfg(tmp_path, *(f"+distill.teachers.{d}=toy:teacher" for d in ("math", "code", "science")))
    paths = _check(tmp_path, ok, str(ASSETS / "base"), {"toy:teacher": str(ASSETS / "teacher")})
    assert set(paths.values()) == {str(ASSETS / "teacher")}


def test_a_teacher_that_cannot_return_prompt_logprobs_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "teacher.backend=openai", "teacher.base_url=http://localhost:1/v1",
               "+distill.teachers.math=teacher", "+distill.teachers.code=branch:code",
               "+distill.teachers.science=branch:science")
    with pytest.raises(ConfigError, match=r"distill.teachers.math=teacher: the openai teacher cannot return prompt "
                                          r"logprobs"):
        _check(tmp_path, cfg, str(ASSETS / "base"), {})
    cfg = _cfg(tmp_path, "+distill.teachers.math='http://host:8000/v1'", "+distill.teachers.code=b",
               "+distill.teachers.science=b")
    with pytest.raises(ConfigError, match=r"an endpoint cannot return prompt logprobs"):
        _check(tmp_path, cfg, str(ASSETS / "base"), {})
    cfg = _cfg(tmp_path, "+eval.engine.engine_kwargs.max_logprobs=0")
    with pytest.raises(ConfigError, match=r"max_logprobs=0: the engine could not return prompt logprobs"):
        _check(tmp_path, cfg, str(ASSETS / "base"), {f"branch:{d}": str(ASSETS / "teacher")
                                                      for d in ("math", "code", "science")})


def test_a_missing_student_or_branch_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match=r"distill.student=merged: no model at"):
        _check(tmp_path, cfg, str(tmp_path / "nothing"), {})
    with pytest.raises(ConfigError, match=r"distill.teachers.code=branch:code: no model at"):
        _check(tmp_path, cfg, str(ASSETS / "base"), {})


def test_train_overrides_the_stage_sets_itself_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"distill.train_overrides.*sets these itself"):
        _cfg(tmp_path, "+distill.train_overrides.max_steps=3")


# ---- offline logit KD: the top-k KL term ----------------------------------------------------

@pytest.mark.parametrize("chunk,ce_weight", [(0, 1.0), (5, 1.0), (5, 0.0)])
def test_kd_term_matches_its_formula_and_pads_weigh_nothing(chunk, ce_weight):
    from transformers import AutoModelForCausalLM

    from rdistill.data.packing import KD_PAD_LOGPROB
    from rdistill.train.forward import token_losses
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "base", dtype=torch.float32)
    b = _batch(model, 3)
    g = torch.Generator().manual_seed(4)
    k, V = 6, model.config.vocab_size
    b["kd_ids"] = torch.randint(0, V, (2, 24, k), generator=g)
    tlp = torch.log_softmax(torch.randn(2, 24, k, generator=g) * 2, -1) - 0.3  # top-k of a larger vocabulary
    tlp[..., -1] = KD_PAD_LOGPROB  # a missing entry
    b["kd_logprobs"] = tlp
    kd = {"weight": 0.5, "temperature": 2.0, "ce_weight": ce_weight}
    got = token_losses(model, b, chunk, kd=kd)
    got.sum().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits.float()
    mask = b["targets"] != IGNORE
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["targets"], ignore_index=IGNORE, reduction="none")
    s = torch.log_softmax(logits / 2.0, -1).gather(-1, b["kd_ids"])[..., :-1]
    t = torch.log_softmax(tlp[..., :-1], -1)  # the pad dropped, the rest renormalised
    want = ce_weight * ce + 0.5 * 4.0 * (t.exp() * (t - s)).sum(-1) * mask
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g1[n], p.grad, atol=2e-5, rtol=1e-3)


def test_mean_baseline_centres_each_domains_advantages(tmp_path):
    from rdistill.distill.rounds import write_rows
    scored = [_scored(5, 6 + i, i, "math") for i in range(3)] + [_scored(4, 9, 7, "code")]
    stats = write_rows(scored, tmp_path / "rows", 64, "mean")
    pr = PackedRows(tmp_path / "rows")
    adv = np.asarray(pr.floats["advantages"])
    tgt = np.asarray(pr.targets)
    lens = {d: sum(len(s["completion_ids"]) for s in scored if s["domain"] == d) for d in ("math", "code")}
    assert stats["domains"]["math"]["tokens"] == lens["math"] and (tgt != IGNORE).sum() == sum(lens.values())
    # the round's reverse KL is reported before the baseline; what is trained on sums to 0 per domain
    raw = np.concatenate([advantages(s) for s in scored if s["domain"] == "math"])
    assert stats["domains"]["math"]["reverse_kl_per_token"] == pytest.approx(-raw.mean(), abs=1e-5)
    assert abs(adv[tgt != IGNORE].sum()) < 1e-3
    none = write_rows(scored, tmp_path / "rows2", 64, "none")
    assert none["domains"] == stats["domains"]
    assert abs(np.asarray(PackedRows(tmp_path / "rows2").floats["advantages"]).sum() - sum(
        advantages(s).sum() for s in scored)) < 1e-3


def test_teacher_top_k_rows_pack_at_the_positions_that_predict_each_completion_token(tmp_path):
    """distill.loss=topk_kl: each completion token's teacher top-k (from its prefill) sits at the
    position that predicts it; prompt positions and a narrower top-k hold the pad (weight 0)."""
    from rdistill.data.packing import KD_PAD_LOGPROB
    from rdistill.distill.rounds import write_rows
    scored = []
    for i, (p, c, k) in enumerate([(5, 6, 3), (4, 9, 2), (7, 3, 3)]):
        s = _scored(p, c, i)
        rng = np.random.default_rng(10 + i)
        s["teacher_top"] = [[(int(t), float(-rng.random())) for t in rng.integers(3, 500, k)] for _ in range(c)]
        scored.append(s)
    stats = write_rows(scored, tmp_path / "rows", 64)
    pr = PackedRows(tmp_path / "rows")
    assert set(pr.kd) == {"kd_ids", "kd_logprobs"} and not pr.floats and stats["rows"] == 1
    ids, lp, tgt = np.asarray(pr.kd["kd_ids"]), np.asarray(pr.kd["kd_logprobs"], np.float32), np.asarray(pr.targets)
    assert ids.shape == (sum(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in scored), 3)
    at = 0
    for s in scored:  # one row, samples in order
        p, c = len(s["prompt_ids"]), len(s["completion_ids"])
        for j, top in enumerate(s["teacher_top"]):
            pos = at + p - 1 + j
            assert tgt[pos] == s["completion_ids"][j]
            assert ids[pos, :len(top)].tolist() == [t for t, _ in top]
            np.testing.assert_allclose(lp[pos, :len(top)], [x for _, x in top], atol=1e-3)
            assert (lp[pos, len(top):] == KD_PAD_LOGPROB).all()
        assert (lp[at:at + p - 1] == KD_PAD_LOGPROB).all()
        at += p + c
    assert (lp[tgt == IGNORE] == KD_PAD_LOGPROB).all()
