"""Budgets that mean the same thing for every trained model, and branches reused when nothing they
depend on changed.

A branch's budget is passes over its own set (`train.epochs`, or the passes its `max_steps` make).
The data-mixture baseline must see each domain's samples as often as that domain's branch did
(the same tokens per domain, not "the same total steps": a set of long samples packs fewer to a
row, so equal steps would give it fewer passes). So the mixture trains one pass over a union in
which each domain's set is repeated by its branch's passes (the fraction as a seeded subset).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from rdistill.config import TrainConfig, to_dict
from rdistill.rundir import file_hash, listing_hash, stable_hash

KEY_FILE = "branch_key.json"
RESULT_FILE = "train_result.json"


def rows_per_step(cfg: TrainConfig) -> int:
    """Packed rows one optimizer step consumes (sequence-parallel ranks share a row)."""
    return cfg.micro_batch_size * cfg.grad_accum * (cfg.num_workers // cfg.sequence_parallel_size)


def passes(total_steps: int, rows: int, cfg: TrainConfig) -> float:
    """How many times a job of `total_steps` sees each of its `rows` packed rows."""
    return total_steps * rows_per_step(cfg) / max(1, rows)


def write_mixture_set(sets: dict[str, str], reps: dict[str, float], out: Path, seed: int) -> dict[str, float]:
    """Write the union of the domains' SFT sets with domain d's lines repeated `reps[d]` times
    (floor(reps) whole copies, then the fraction as a seeded subset), shuffled; returns the
    repetitions written per domain (lines written / lines in the set)."""
    rng = random.Random(seed)
    lines: list[str] = []
    written: dict[str, float] = {}
    for d in sorted(sets):
        rows = [l for l in Path(sets[d]).read_text().splitlines() if l.strip()]
        whole, frac = int(math.floor(reps[d])), reps[d] - math.floor(reps[d])
        part = rng.sample(rows, round(frac * len(rows)))
        lines += rows * whole + part
        written[d] = (len(rows) * whole + len(part)) / max(1, len(rows))
    rng.shuffle(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return written


def tokens_per_domain(data: dict, reps: float) -> int:
    """Tokens (prompt + answer) a model trains on from one domain's kept samples seen `reps` times."""
    return int(round(data["tokens"] * reps))


def worker_seconds(wall_s: float, cfg: TrainConfig, device: str) -> tuple[float, str]:
    """A job's compute: its wall time times what its workers hold (GPUs on GPUs, else CPUs)."""
    if device == "gpu":
        return round(wall_s * cfg.num_workers * (cfg.gpus_per_worker or 1), 1), "GPU-s"
    return round(wall_s * cfg.num_workers * cfg.cpus_per_worker, 1), "CPU-s"


# Train settings that do not change what a branch learns: the same branch either way.
NOT_ABOUT_THE_BRANCH = ("mixture_baseline", "concurrent")


def _where(path: str | None, root: Path | None) -> str | None:
    """A model's place in a key: relative to the run directory when inside it (the toy's models),
    so a copied or moved run directory reuses its branches; absolute otherwise."""
    if path is None or root is None:
        return path
    p, r = Path(path).absolute(), Path(root).absolute()
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(p)


def branch_key(base_dir: str, sft_file: str, cfg: TrainConfig, device: str, kd_teacher: str | None = None,
               root: Path | None = None) -> str:
    """What a branch depends on: its SFT set's bytes, its train config, the base (where it is and
    its files' names and sizes), the device, and the teacher whose logprobs offline KD adds to its
    loss. Models inside `root` (the run directory) are keyed by their place in it."""
    train = {k: v for k, v in to_dict(cfg).items() if k not in NOT_ABOUT_THE_BRANCH}
    return stable_hash({"sft": file_hash(sft_file), "train": train,
                        "base": [_where(base_dir, root), listing_hash(Path(base_dir))],
                        "device": device, "kd_teacher": _where(kd_teacher, root)})


def reusable(previous: Path, key: str) -> dict | None:
    """The saved result of a branch trained before with the same key (None: train it)."""
    try:
        if json.loads((previous / KEY_FILE).read_text())["key"] != key:
            return None
        return json.loads((previous / RESULT_FILE).read_text())
    except (OSError, ValueError, KeyError):
        return None


def mark(out: Path, key: str, result: dict) -> None:
    """Record a trained branch's key and result next to its model, for the next run to reuse."""
    (out / KEY_FILE).write_text(json.dumps({"key": key}))
    (out / RESULT_FILE).write_text(json.dumps(result))
