"""The from-scratch recipe of the toy models, run end to end at a tiny size through the
project's training code (Ray Train + DeepSpeed), and the shipped models checked against it in kind."""

from __future__ import annotations

import json

import pytest

from rdistill.toy.build import (ASSETS, build, build_tokenizer, recipe_for, recipe_hash, shipped_recipe,
                                write_traces)


def test_shipped_models_are_what_the_recipe_makes_in_kind(tmp_path):
    """Same tokenizer (retrained from the recipe's traces), same architecture and sizes."""
    from transformers import AutoConfig, AutoTokenizer

    from rdistill.toy.model import qwen2_config
    info = shipped_recipe()
    recipe = info["recipe"]
    # built by today's recipe (RECIPE in rdistill/toy/build.py), through the project's trainer
    assert info["hash"] == recipe_hash(recipe) == recipe_hash(recipe_for(recipe["seed"]))
    assert info["trainer"] == "rdistill.train.sft.train_sft"
    tok = build_tokenizer(recipe, write_traces(recipe, tmp_path))
    for name in ("teacher", "base"):
        shipped = AutoTokenizer.from_pretrained(ASSETS / name)
        assert shipped.get_vocab() == tok.get_vocab()
        assert shipped.chat_template == tok.chat_template
        cfg = AutoConfig.from_pretrained(ASSETS / name)
        want = qwen2_config(tok, max_len=recipe["max_len"], **recipe["shape"])
        for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "max_position_embeddings", "eos_token_id"):
            assert getattr(cfg, k) == getattr(want, k), k
        assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM's CPU attention needs it
    assert info["params"] > 500_000


@pytest.mark.slow
def test_recipe_builds_teacher_and_base_through_train_sft(tmp_path, ray_cluster):
    """A tiny recipe (small model, few traces, a few steps) goes through every step of the real
    build: traces, tokenizer, init, train_sft for the teacher, then for the base from the teacher on
    slipped traces, recipe.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    shape = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                 intermediate_size=128)
    recipe = recipe_for(0, traces_per_domain=40, teacher_steps=3, shape=shape, vocab_size=300,
                        base={"steps": 2, "lr": 1e-3, "warmup_ratio": 0.0, "slip_rates": {"math": 1.0}})
    info = build(tmp_path / "toy", recipe)
    assert info["teacher"]["steps"] == 3 and info["base"]["steps"] == 2
    saved = json.loads((tmp_path / "toy" / "recipe.json").read_text())
    assert saved["recipe"] == recipe and saved["hash"] == info["hash"]
    for name in ("teacher", "base"):
        d = tmp_path / "toy" / name
        tok = AutoTokenizer.from_pretrained(d)
        assert "<think>" in tok.get_vocab() and tok.eos_token == "<|im_end|>"
        model = AutoModelForCausalLM.from_pretrained(d)
        assert sum(p.numel() for p in model.parameters()) == info["params"]
    # the base is the teacher trained on: same shape, other weights
    import torch
    base, teacher = (AutoModelForCausalLM.from_pretrained(tmp_path / "toy" / n) for n in ("base", "teacher"))
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), teacher.state_dict().values()))
    assert not (tmp_path / "toy" / ".work").exists()
