"""Long-row training: the chunked loss, Ulysses sequence parallelism, memory-mapped rows and the
Ray Data tokenizer, each against the path it replaces."""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import pytest
import torch

from rdistill.config import TrainConfig
from rdistill.data.packing import PackedRows, build_rows, pack_first_fit, save_rows
from rdistill.data.sft import IGNORE, tokenize_chat
from rdistill.errors import ConfigError
from rdistill.toy.model import tiny_test_model
from rdistill.train.forward import loss_sum, token_losses
from sft_samples import arithmetic_messages, write_sft

SP_SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=256)


def _qwen2(vocab: int, tie: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=256, tie_word_embeddings=tie,
                      max_position_embeddings=1024, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).float()


def _packed_batch(vocab: int, seed: int = 0) -> dict:
    """Two rows of three packed samples each (positions restart per sample), prompt tokens and
    the padding at the end of the second row without loss."""
    g = torch.Generator().manual_seed(seed)
    T = 160
    ids = torch.randint(0, vocab, (2, T), generator=g)
    pos = torch.cat([torch.arange(70), torch.arange(50), torch.arange(40)]).expand(2, T).clone()
    tgt = torch.randint(0, vocab, (2, T), generator=g)
    tgt[:, :20] = IGNORE
    tgt[:, 70:85] = IGNORE
    tgt[1, 130:] = IGNORE
    pos[1, 130:] = torch.arange(30)
    return {"input_ids": ids, "position_ids": pos, "targets": tgt}


def _loss_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    tl = token_losses(model, batch, chunk)
    (tl.sum() / (batch["targets"] != IGNORE).sum()).backward()
    return tl.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("vocab,tie,chunks", [(300, True, (7, 64, 4096)), (151936, False, (48,))])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(vocab, tie, chunks):
    model = _qwen2(vocab, tie)
    batch = _packed_batch(vocab)
    full_l, full_g = _loss_and_grads(model, batch, 0)
    for chunk in chunks:  # uneven chunks, several, and one chunk for everything
        l, g = _loss_and_grads(model, batch, chunk)
        assert torch.allclose(l, full_l, rtol=1e-5, atol=1e-5), (chunk, (l - full_l).abs().max())
        assert (l[batch["targets"] == IGNORE] == 0).all()
        for n in full_g:
            err = (g[n] - full_g[n]).abs().max() / full_g[n].abs().max()
            assert err < 1e-5, (chunk, n, err.item())
    # loss_sum (what the training loop backpropagates) is the same sum.
    with torch.no_grad():
        assert loss_sum(model, batch, chunks[0]).item() == pytest.approx(full_l.sum().item(), rel=1e-5)


def test_chunked_loss_in_bf16_stays_close_to_the_full_logits():
    model = _qwen2(151936, False).to(torch.bfloat16)
    batch = _packed_batch(151936, seed=1)
    full_l, full_g = _loss_and_grads(model, batch, 0)
    l, g = _loss_and_grads(model, batch, 64)
    assert torch.allclose(l, full_l, rtol=1e-2, atol=1e-2)
    for n in full_g:  # bf16 grads of the chunks accumulate in bf16 (as Liger's): a looser bound
        err = ((g[n].float() - full_g[n].float()).norm() / full_g[n].float().norm()).item()
        assert err < 2e-2, (n, err)


def test_the_liger_slot_gets_weight_hidden_and_targets_and_its_sum_is_the_loss(monkeypatch):
    """Liger needs a GPU; a stand-in with its module's call (weight, input, target) -> summed
    loss checks the plumbing around it (the real kernel is only used on GPUs)."""
    import rdistill.train.chunked_loss as cl

    class FakeLiger(torch.nn.Module):
        def __init__(self, ignore_index, reduction):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, weight, h, t):
            return torch.nn.functional.cross_entropy((h @ weight.t()).float(), t, ignore_index=self.ignore_index,
                                                     reduction=self.reduction)
    monkeypatch.setattr(cl, "_liger", lambda: FakeLiger)
    model = _qwen2(300, True)
    batch = _packed_batch(300)
    full = token_losses(model, batch, 0).sum()
    assert loss_sum(model, batch, 64, kernel="liger").item() == pytest.approx(full.item(), rel=1e-5)


def test_chunked_loss_refuses_models_that_rescale_logits():
    model = _qwen2(300, True)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="loss_chunk_tokens=0"):
        token_losses(model, _packed_batch(300), 64)


def test_first_fit_tree_packs_like_the_linear_scan():
    def linear(lengths, max_len):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        bins, room = [], []
        for i in order:
            for b, r in enumerate(room):
                if lengths[i] <= r:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(max_len - lengths[i])
        return [sorted(b) for b in bins]
    rng = random.Random(0)
    for _ in range(200):
        m = rng.choice([10, 100, 1000])
        lens = [rng.randint(1, m) for _ in range(rng.randint(1, 200))]
        assert pack_first_fit(lens, m) == linear(lens, m)
    lens = [min(16384, max(50, int(rng.lognormvariate(8, 0.9)))) for _ in range(200_000)]
    t = time.perf_counter()
    bins = pack_first_fit(lens, 16384)
    assert time.perf_counter() - t < 30 and sum(len(b) for b in bins) == len(lens)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    return str(tiny_test_model(d / "base", **SP_SHAPE))


def _sample_rows(model_dir: str, tmp, n: int = 12, max_len: int = 192):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(3)
    samples = [tokenize_chat(tok, arithmetic_messages(rng.randint(0, 99), rng.randint(0, 99), system=i % 2 == 0),
                             str(i)) for i in range(n)]
    rows = build_rows(samples, max_len, True)
    save_rows(tmp / "rows", samples, rows)
    return samples, rows, PackedRows(tmp / "rows"), tok


def test_packed_rows_are_memory_mapped_and_flatten_into_one_row(sp_model, tmp_path):
    samples, rows, pr, tok = _sample_rows(sp_model, tmp_path)
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == ["ids.npy", "offsets.npy", "positions.npy",
                                                                     "targets.npy"]
    assert all(isinstance(a, np.memmap) for a in (pr.ids, pr.targets, pr.positions))
    for r, row in enumerate(rows):  # the row layout of before: samples in order, positions per sample
        a, e = pr.offsets[r], pr.offsets[r + 1]
        assert pr.ids[a:e].tolist() == [t for i in row for t in samples[i].input_ids]
        assert pr.targets[a:e].tolist() == [t for i in row for t in samples[i].targets]
        assert pr.positions[a:e].tolist() == [p for i in row for p in range(len(samples[i].input_ids))]
    pick = [2, 0, 1]
    b = pr.batch(pick, tok.pad_token_id)
    f = pr.batch(pick, tok.pad_token_id, flat=True, multiple=4)
    T = sum(pr.row_length(r) for r in pick)
    assert f["input_ids"].shape == (1, -(-T // 4) * 4) and f["tokens"] == b["tokens"] == T
    real = torch.cat([b["input_ids"][i, :pr.row_length(r)] for i, r in enumerate(pick)])
    assert torch.equal(f["input_ids"][0, :T], real)
    assert (f["targets"][0, T:] == IGNORE).all() and (f["position_ids"][0, T:] == torch.arange(f["input_ids"].shape[1] - T)).all()
    # The flat row trains on the same loss as the padded batch (positions keep rows apart).
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sp_model, attn_implementation="sdpa")
    with torch.no_grad():
        assert token_losses(model, f, 64).sum().item() == pytest.approx(token_losses(model, b).sum().item(), rel=1e-5)


_RANK_READS = """
import resource, sys
import numpy as np
import torch  # noqa: F401 (imported by batch(); its own memory is not the file's)
from rdistill.data.packing import PackedRows, step_rows
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = PackedRows(sys.argv[1])
world, rank, tokens = 8, 0, 0
for step in range(20):  # what a worker does each step: its slice of the step's rows, one micro-batch
    mine = step_rows(len(rows), step, world, 0)[rank:rank + 1]
    tokens += rows.batch(mine, 0)["tokens"]
print(tokens, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_rank_reads_its_rows_of_a_packed_file_far_larger_than_its_budget(tmp_path):
    """1.2 GB of packed rows (1,000 rows of 100k tokens, sparse on disk so it costs no writing):
    a rank trains 20 steps from it and its memory grows by its rows only, not by the file."""
    import subprocess
    import sys
    n_rows, row = 1000, 100_000
    d = tmp_path / "rows"
    d.mkdir()
    for c in ("ids", "targets", "positions"):
        np.lib.format.open_memmap(d / f"{c}.npy", mode="w+", dtype=np.int32, shape=(n_rows * row,)).flush()
    np.save(d / "offsets.npy", np.arange(n_rows + 1, dtype=np.int64) * row)
    size_mb = sum(f.stat().st_size for f in d.iterdir()) >> 20
    p = subprocess.run([sys.executable, "-c", _RANK_READS, str(d)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    tokens, grew_mb = map(int, p.stdout.split())
    assert tokens == 20 * row and size_mb > 1000
    assert grew_mb < size_mb // 4, f"a rank's memory grew by {grew_mb} MB reading 20 rows of a {size_mb} MB file"


def test_sequence_parallel_settings_are_checked_in_one_line(sp_model, tmp_path):
    from rdistill.train.sft import prepare_data
    sft = str(write_sft(tmp_path / "s.jsonl", 4))
    with pytest.raises(ConfigError, match="must divide train.num_workers=3"):
        prepare_data(sp_model, [sft], TrainConfig(num_workers=3, sequence_parallel_size=2, max_len=256), tmp_path / "r")
    with pytest.raises(ConfigError, match=r"attention heads \(4\)"):
        prepare_data(sp_model, [sft], TrainConfig(num_workers=8, sequence_parallel_size=8, max_len=256), tmp_path / "r")
    info = prepare_data(sp_model, [sft], TrainConfig(num_workers=4, sequence_parallel_size=4, max_len=256), tmp_path / "r")
    assert info["kept"] == 4


# ---- Sequence parallelism across processes (gloo on the CPU) -----------------------------------

def _sp_rank(rank: int, world: int, store: str, model_dir: str, batch: dict, zeros: list, chunk: int, out: str):
    """One rank of a DeepSpeed + Ulysses run: its slice of the row, loss and full gradients."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from rdistill.train.loop import _no_shm_comm_build, ds_config
    from rdistill.train.sequence_parallel import grad_scale, setup_ulysses, shard
    _no_shm_comm_build()
    # A file store, not a TCP port picked beforehand: on a busy host (a Ray cluster of the same
    # session opens ports all the time) the picked port can be taken before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    mpu = setup_ulysses(model_dir, "sdpa", world)
    n = (batch["targets"] != IGNORE).sum()
    local = shard(batch, rank, world)
    res = {}
    for zero in zeros:
        tc = TrainConfig(zero_stage=zero, sequence_parallel_size=world, micro_batch_size=1)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                          config=ds_config(tc, False), mpu=mpu)
        ls = loss_sum(engine, local, chunk)
        engine.backward(ls * grad_scale(world, zero) / n)
        loss = ls.detach().clone()
        dist.all_reduce(loss)
        grads = {k: safe_get_full_grad(p).detach().float().clone() for k, p in engine.module.named_parameters()}
        res[zero] = {"loss": loss.item() / n.item(), "grads": grads}
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    # Leave without the interpreter's teardown: gloo's and DeepSpeed's threads destroyed in
    # arbitrary order at exit can abort a rank after its work is done (seen once in CI).
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
def test_two_rank_sequence_parallel_equals_one_rank_under_every_zero_stage(sp_model, tmp_path):
    """One packed row (several samples, position resets, prompt and pad tokens without loss)
    split over 2 ranks (2 of the 4 heads each after the all-to-all), ZeRO 0-3, chunked loss:
    the loss and every parameter's gradient equal a plain 1-process full-logits run."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM
    _, _, pr, tok = _sample_rows(sp_model, tmp_path)
    batch = pr.batch(list(range(len(pr))), tok.pad_token_id, flat=True, multiple=2)
    assert (batch["position_ids"][0, 1:] == 0).sum() >= 3  # really several samples in the row
    model = AutoModelForCausalLM.from_pretrained(sp_model, dtype=torch.float32, attn_implementation="sdpa")
    ref_l, ref_g = _loss_and_grads(model, batch, 0)
    ref_loss = (ref_l.sum() / (batch["targets"] != IGNORE).sum()).item()
    out = str(tmp_path / "sp.pt")
    t = time.time()
    mp.spawn(_sp_rank, args=(2, str(tmp_path / "store"), sp_model, batch, [0, 1, 2, 3], 32, out), nprocs=2)
    res = torch.load(out)
    report = {}
    for zero, r in res.items():
        errs = {n: ((g - ref_g[n]).abs().max() / ref_g[n].abs().max()).item() for n, g in r["grads"].items()}
        report[zero] = {"loss_diff": abs(r["loss"] - ref_loss), "max_rel_grad_diff": max(errs.values())}
        assert r["loss"] == pytest.approx(ref_loss, rel=1e-5), zero
        assert max(errs.values()) < 1e-4, (zero, sorted(errs.items(), key=lambda x: -x[1])[:3])
    print("sp=2 vs 1 rank:", json.dumps(report), f"({time.time() - t:.0f}s)")


# ---- Tokenizing and packing as a Ray Data job ---------------------------------------------------

@pytest.mark.slow
def test_ray_data_tokenizer_writes_the_same_rows_as_the_driver(ray_cluster, sp_model, tmp_path, monkeypatch):
    """A few hundred samples over two files (blank lines, samples too long for max_len), cut into
    many small byte ranges: the Ray Data job writes the same rows, byte for byte, and the same
    counts as the driver path; a bad line fails with the same one-line message."""
    import rdistill.data.tokenize_ray as tr
    from rdistill.data.sft import SFTDataError
    from rdistill.train.sft import prepare_data
    monkeypatch.setattr(tr, "CHUNK_BYTES", 4096)  # ~25 tasks over the two files
    a = write_sft(tmp_path / "a.jsonl", 200, seed=1, long_every=23)
    b = write_sft(tmp_path / "b.jsonl", 150, seed=2)
    with open(a, "a") as f:
        f.write("\n\n")
    files = [str(a), str(b)]
    out = {}
    for ray_data in (False, True):
        cfg = TrainConfig(max_len=200, tokenize_with_ray_data=ray_data, micro_batch_size=2)
        t = time.perf_counter()
        info = prepare_data(sp_model, files, cfg, tmp_path / f"rows-{ray_data}")
        out[ray_data] = (info, PackedRows(tmp_path / f"rows-{ray_data}"), time.perf_counter() - t)
    (di, dr, dt), (ri, rr, rt) = out[False], out[True]
    print(f"driver {dt:.1f}s, Ray Data {rt:.1f}s, {di['kept']} samples, {di['rows']} rows")
    assert di == ri and di["samples"] == 350 and di["dropped_too_long"] == 9 and di["rows"] < di["kept"]
    for col in ("ids", "targets", "positions", "offsets"):
        assert np.array_equal(getattr(dr, col), getattr(rr, col)), col
    # A bad line in the second file: the same error, with the same line number.
    lines = b.read_text().splitlines()
    lines[97] = '{"id": "x", "messages": "not a list"}'
    b.write_text("\n".join(lines) + "\n")
    errors = []
    for ray_data in (False, True):
        with pytest.raises(SFTDataError) as e:
            prepare_data(sp_model, files, TrainConfig(max_len=200, tokenize_with_ray_data=ray_data), tmp_path / "bad")
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "b.jsonl:98: needs 'messages'" in errors[0]


# ---- End to end through Ray Train ---------------------------------------------------------------

@pytest.mark.slow
def test_train_sft_with_two_sequence_parallel_workers_follows_the_one_worker_curve(ray_cluster, sp_model, tmp_path):
    """train_sft with sequence_parallel_size=2 (2 workers, one data-parallel replica, ZeRO-3,
    two packed rows per micro-batch laid out as one row and split in two) trains on the same
    rows with the same loss curve as 1 worker without SP."""
    from rdistill.train.sft import train_sft
    sft = str(write_sft(tmp_path / "s.jsonl", 40, seed=5))
    base = dict(zero_stage=3, precision="fp32", max_steps=3, lr=3e-3, warmup_ratio=0.0, micro_batch_size=2,
                max_len=256, checkpoint_every=100, max_failures=0, loss_chunk_tokens=64)
    curves = {}
    for sp in (1, 2):
        m = train_sft(sp_model, [sft], str(tmp_path / f"out-{sp}"), TrainConfig(num_workers=sp, sequence_parallel_size=sp, **base),
                      name=f"sp{sp}", storage_dir=str(tmp_path / "store"))
        curves[sp] = [l for _, l in m["loss_curve"]]
        assert m["steps"] == 3 and m["padding_share"] < 0.5
    print("loss curves:", curves)
    assert curves[2] == pytest.approx(curves[1], rel=1e-4)
