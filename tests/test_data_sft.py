"""SFT tokenization, loss masking and neat packing (fast: transformers on the CPU, no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from rdistill.config import TrainConfig
from rdistill.data.packing import (PackedRows, build_rows, pack_first_fit, padding_share, save_rows,
                                   step_rows)
from rdistill.data.sft import IGNORE, SFTDataError, tokenize_chat, tokenize_files
from rdistill.toy.model import tiny_test_model
from rdistill.train.forward import token_losses
from rdistill.train.sft import prepare_data
from sft_samples import arithmetic_messages, write_sft


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tiny_test_model(tmp_path_factory.mktemp("student") / "base")
    return d, AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")


def test_loss_mask_covers_exactly_the_assistant_tokens(student):
    _, tok, _ = student
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "<think>2+3=5</think> The answer is \\boxed{5}."},
            {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "<think>4+4=8</think> The answer is \\boxed{8}."}]
    t = tokenize_chat(tok, msgs, "x")
    assert t.input_ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    # The masked tokens form one run per assistant turn, and each run decodes to exactly that
    # turn's content followed by the end-of-turn token: nothing of the prompt, header or newline.
    runs, cur = [], []
    for i, m in zip(t.input_ids, t.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == want
    # Targets are shifted within the sample: position j predicts token j+1 only if it is masked.
    tg = t.targets
    assert len(tg) == len(t.input_ids) and tg[-1] == IGNORE
    assert [j + 1 for j, x in enumerate(tg) if x != IGNORE] == [j for j, m in enumerate(t.loss_mask) if m]


def test_too_long_samples_are_dropped_and_counted(student, tmp_path):
    _, tok, _ = student
    path = write_sft(tmp_path / "s.jsonl", 20, long_every=5)
    samples, st = tokenize_files(tok, [str(path)], max_len=128)
    assert (st.samples, st.dropped_too_long, st.kept) == (20, 4, 16)
    assert all(len(s.input_ids) <= 128 for s in samples)
    assert st.loss_tokens == sum(sum(s.loss_mask[1:]) for s in samples)


def test_bad_inputs_fail_before_training_with_one_line(student, tmp_path):
    d, tok, _ = student
    cfg = TrainConfig(max_len=256)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SFTDataError, match="is empty"):
        prepare_data(str(d), [str(empty)], cfg, tmp_path / "rows.npz")
    no_asst = tmp_path / "noasst.jsonl"
    no_asst.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": " "}]}) + "\n"
                       + json.dumps({"id": "b", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SFTDataError, match="no assistant tokens"):
        prepare_data(str(d), [str(no_asst)], cfg, tmp_path / "rows.npz")
    with pytest.raises(SFTDataError, match="max_position_embeddings=1024"):
        prepare_data(str(d), [str(write_sft(tmp_path / "ok.jsonl", 4))], TrainConfig(max_len=4096),
                     tmp_path / "rows.npz")
    with pytest.raises(SFTDataError, match="does not exist"):
        prepare_data(str(d), [str(tmp_path / "missing.jsonl")], cfg, tmp_path / "rows.npz")
    tok.chat_template = None
    try:
        with pytest.raises(SFTDataError, match="no chat template"):
            tokenize_files(tok, [str(tmp_path / "ok.jsonl")], 256)
    finally:
        tok.chat_template = __import__("rdistill.toy.tokenizer", fromlist=["x"]).CHAT_TEMPLATE


def test_first_fit_packing_and_padding_share():
    lens = [90, 60, 50, 40, 30, 20, 10]
    bins = pack_first_fit(lens, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lens[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 300 tokens in rows of 100: perfect fit exists and FFD finds it
    assert padding_share([100, 50], 2) == pytest.approx(0.25)
    assert padding_share([100, 50], 1) == 0.0


def test_step_rows_are_seeded_epochs():
    seen = [r for s in range(5) for r in step_rows(10, s, 4, seed=1)]  # 20 rows = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert step_rows(10, 3, 4, seed=1) == seen[12:16]  # a resumed run gets the same rows
    assert seen[:10] != seen[10:]


def test_packed_batches_give_the_same_per_sample_loss_as_unpacked(student, tmp_path):
    _, tok, model = student
    samples = [tokenize_chat(tok, arithmetic_messages(a, b, system=a % 2 == 0), f"{a}{b}")
               for a, b in [(1, 2), (3, 4), (9, 9), (0, 7), (5, 5), (8, 1)]]
    lens = [len(s.input_ids) for s in samples]
    # Oracle: each sample alone, no padding, no packing.
    with torch.no_grad():
        alone = [token_losses(model, {"input_ids": torch.tensor([s.input_ids]),
                                      "position_ids": torch.arange(len(s.input_ids))[None],
                                      "targets": torch.tensor([s.targets])})[0].sum().item() for s in samples]
    results = {}
    for packing in (True, False):
        rows = build_rows(samples, max_len=3 * max(lens), packing=packing)
        save_rows(tmp_path / f"{packing}.npz", samples, rows)
        pr = PackedRows(tmp_path / f"{packing}.npz")
        batch = pr.batch(list(range(len(pr))), tok.pad_token_id)
        with torch.no_grad():
            tl = token_losses(model, batch)
        per = {}
        for b, row in enumerate(rows):
            start = 0
            for i in row:
                per[i] = tl[b, start:start + lens[i]].sum().item()
                start += lens[i]
        results[packing] = [per[i] for i in range(len(samples))]
    assert len(build_rows(samples, 3 * max(lens), True)) < len(samples)  # really packed
    assert results[True] == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert results[False] == pytest.approx(alone, rel=1e-5, abs=1e-5)
    # Control: the same packed rows with positions that do not reset let samples see each other.
    rows = build_rows(samples, 3 * max(lens), True)
    pr = PackedRows(tmp_path / "True.npz")
    batch = pr.batch(list(range(len(pr))), tok.pad_token_id)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        leaky = token_losses(model, batch).sum().item()
    assert abs(leaky - sum(alone)) > 1e-3 * sum(alone)


def test_prepare_data_writes_memory_mapped_rows_and_old_npz_files_still_read(student, tmp_path):
    import numpy as np
    d, tok, _ = student
    info = prepare_data(str(d), [str(write_sft(tmp_path / "s.jsonl", 10))], TrainConfig(max_len=256), tmp_path / "rows")
    pr = PackedRows(tmp_path / "rows")
    assert len(pr) == info["rows"] and isinstance(pr.ids, np.memmap)
    assert int(pr.offsets[-1]) == info["tokens"]
    # A rows file of an older run (one .npz) reads the same.
    np.savez(tmp_path / "old.npz", ids=np.asarray(pr.ids), targets=np.asarray(pr.targets),
             positions=np.asarray(pr.positions), offsets=pr.offsets)
    old = PackedRows(tmp_path / "old.npz")
    a, b = old.batch([0, 1], tok.pad_token_id), pr.batch([0, 1], tok.pad_token_id)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "position_ids", "targets"))


def test_a_branch_key_survives_a_copied_run_dir_but_not_another_base(tmp_path):
    """A run directory copied or moved (its toy base inside it) keeps its branches' keys, so an
    update retrains only the changed domain; a base elsewhere is keyed by its absolute path."""
    import shutil

    from rdistill.train.budget import branch_key
    a = tmp_path / "a"
    (a / "toy" / "base").mkdir(parents=True)
    (a / "toy" / "base" / "model.safetensors").write_bytes(b"x" * 10)
    (a / "math.jsonl").write_text('{"messages": []}\n')
    b = tmp_path / "b"
    shutil.copytree(a, b)
    cfg = TrainConfig()
    key = lambda root, base: branch_key(str(base), str(root / "math.jsonl"), cfg, "cpu", root=root)  # noqa: E731
    assert key(a, a / "toy" / "base") == key(b, b / "toy" / "base")
    # the same base files outside the run dir: a different model as far as the key knows
    assert key(a, a / "toy" / "base") != key(b, a / "toy" / "base")
    (b / "math.jsonl").write_text('{"messages": [1]}\n')
    assert key(a, a / "toy" / "base") != key(b, b / "toy" / "base")
