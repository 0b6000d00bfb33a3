"""Preflight checks: each failure is triggered and reported in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from rdistill.cli.compose import load
from rdistill.preflight import PreflightError, check_merge_inputs, check_student_tokenizer
from rdistill.rundir import RunDir
from rdistill.toy.model import tiny_test_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_test_model(tmp_path_factory.mktemp("tiny") / "m")


def _one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_student_tokenizer_needs_chat_template_and_eot_stop(tiny, tmp_path):
    check_student_tokenizer(str(tiny))  # the good one passes
    no_tpl = tmp_path / "no_tpl"
    shutil.copytree(tiny, no_tpl)
    (no_tpl / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((no_tpl / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (no_tpl / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(PreflightError) as e:
        check_student_tokenizer(str(no_tpl))
    assert "has no chat template" in _one_line(e)

    bad_eos = tmp_path / "bad_eos"
    shutil.copytree(tiny, bad_eos)
    gc = json.loads((bad_eos / "generation_config.json").read_text())
    gc["eos_token_id"] = [5]
    (bad_eos / "generation_config.json").write_text(json.dumps(gc))
    with pytest.raises(PreflightError) as e:
        check_student_tokenizer(str(bad_eos))
    assert "eos_token_id to the end-of-turn token" in _one_line(e)


# DeepSeek-R1-Distill-style turns whose assistant content is cut at </think> (as that model's
# own template does), written for this test.
STRIPPING_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}<｜Assistant｜>{{ c }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


@pytest.fixture()
def r1_like(tiny, tmp_path):
    """A student whose tokenizer has R1-Distill's turn tokens and a template that drops reasoning."""
    from transformers import AutoTokenizer
    d = tmp_path / "r1_like"
    shutil.copytree(tiny, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"eos_token": "<｜end▁of▁sentence｜>",
                            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]})
    tok.chat_template = STRIPPING_TEMPLATE
    tok.save_pretrained(d)
    gc = json.loads((d / "generation_config.json").read_text())
    gc["eos_token_id"] = tok.eos_token_id
    (d / "generation_config.json").write_text(json.dumps(gc))
    return d


def test_sft_template_must_keep_the_reasoning(r1_like, tmp_path):
    from transformers import AutoTokenizer

    from rdistill.config import TrainConfig
    from rdistill.data.sft import SFTDataError, tokenize_files
    from rdistill.train.sft import prepare_data
    with pytest.raises(PreflightError) as e:
        check_student_tokenizer(str(r1_like))
    assert "drops the <think> reasoning" in _one_line(e) and "r1_distill_keep_reasoning" in str(e.value)
    with pytest.raises(PreflightError) as e:
        check_student_tokenizer(str(r1_like), "no_such_template")
    assert "neither a bundled template" in _one_line(e)
    check_student_tokenizer(str(r1_like), "r1_distill_keep_reasoning")  # the bundled fix passes

    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"id": "s0", "messages": [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2+3=5 carry 0\n</think>\n\nThe answer is 5."}]}) + "\n")
    # Training with the student's own template fails before any worker starts...
    with pytest.raises(SFTDataError) as e:
        tokenize_files(AutoTokenizer.from_pretrained(r1_like), [str(sft)], 256)
    assert "drops the <think> reasoning" in _one_line(e)
    # ...and with the override, the loss covers the reasoning and the end of turn.
    cfg = TrainConfig(max_len=256, chat_template="r1_distill_keep_reasoning", num_workers=1)
    info = prepare_data(str(r1_like), [str(sft)], cfg, tmp_path / "rows.npz")
    assert info["kept"] == 1
    from rdistill.data.chat_template import apply_chat_template_override
    from rdistill.data.sft import tokenize_chat
    tok = apply_chat_template_override(AutoTokenizer.from_pretrained(r1_like), cfg.chat_template)
    t = tokenize_chat(tok, json.loads(sft.read_text())["messages"], "s0")
    learned = tok.decode([i for i, m in zip(t.input_ids, t.loss_mask) if m])
    assert learned.startswith("<think>") and "2+3=5 carry 0" in learned
    assert learned.endswith("The answer is 5.<｜end▁of▁sentence｜>")
    assert "What is" not in learned


def test_merge_inputs_share_architecture_and_vocab(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    c = json.loads((other / "config.json").read_text())
    c["vocab_size"] += 7
    (other / "config.json").write_text(json.dumps(c))
    cfg = load([f"run_dir={tmp_path}/run",
                f"merge.candidates.0.steps.0.models=[{{model: {other}}}]"])
    with pytest.raises(PreflightError) as e:
        check_merge_inputs(cfg, RunDir(cfg.run_dir), str(tiny))
    assert "vocab" in _one_line(e) and "step mid" in str(e.value)
    cfg_ok = load([f"run_dir={tmp_path}/run", f"merge.candidates.0.steps.0.models=[{{model: {tiny}}}]"])
    check_merge_inputs(cfg_ok, RunDir(cfg_ok.run_dir), str(tiny))


def test_teacher_format_probe():
    from rdistill.generate.stage import GenerationError, check_probe_answers
    assert check_probe_answers([{"completion": "<think>a</think> The answer is \\boxed{1}."},
                                {"completion": "no think"}]) == 1
    with pytest.raises(GenerationError) as e:
        check_probe_answers([{"completion": "The answer is 1."}, {"completion": "Sure! 2"}])
    assert "no <think>...</think> reasoning" in _one_line(e)
