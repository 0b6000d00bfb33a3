"""Checks before a merge: every input exists and is readable, all share architecture, tensor names
and shapes; vocabulary-size differences in embeddings and LM heads are refused, or cut to the
common first rows when asked (mergekit's --unsafe-truncate-embeddings)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rdistill.merge.st_io import InputError, TensorLoc, model_tensors


@dataclass
class InputModel:
    ref: str
    path: str
    config: dict
    tensors: dict[str, TensorLoc]


def load_input(ref: str, path: str) -> InputModel:
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise InputError(f"{ref}: model directory {path} not found")
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{cfg_path}: missing (a merge input must be an HF model directory)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path}: unreadable ({e})") from None
    return InputModel(ref, path, config, model_tensors(path))


def _vocab(cfg: dict) -> int | None:
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(v) if v else None


def check_inputs(models: list[InputModel], truncate_vocab: bool = False) -> tuple[dict[str, tuple], int | None]:
    """Validate the inputs against the first; returns ({tensor: merged shape}, common vocab size
    when embeddings were cut, else None). Raises InputError with one line naming the problem."""
    first = models[0]
    arch = (first.config.get("model_type"), first.config.get("architectures"))
    for m in models[1:]:
        other = (m.config.get("model_type"), m.config.get("architectures"))
        if other != arch:
            raise InputError(f"architectures differ: {first.ref} is {arch[0]} {arch[1]}, {m.ref} is "
                             f"{other[0]} {other[1]}; merge only models of one architecture")
    names = set(first.tensors)
    for m in models[1:]:
        missing, extra = sorted(names - set(m.tensors)), sorted(set(m.tensors) - names)
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has extra {extra[:3]}"
            raise InputError(f"tensor names differ: {m.ref} {what} compared with {first.ref} "
                             f"({len(missing)} missing, {len(extra)} extra)")
    vocabs = [_vocab(m.config) for m in models]
    shapes: dict[str, tuple] = {}
    cut = None
    for name in first.tensors:
        ss = [m.tensors[name].shape for m in models]
        if all(s == ss[0] for s in ss):
            shapes[name] = ss[0]
            continue
        # a vocabulary axis: dim 0 differs, equals each model's vocab size (or the name says so)
        is_vocab = all(len(s) == len(ss[0]) and s[1:] == ss[0][1:] for s in ss) and (
            all(v is not None and s[0] == v for s, v in zip(ss, vocabs))
            or any(k in name for k in ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")))
        if not is_vocab:
            desc = ", ".join(f"{m.ref} {tuple(s)}" for m, s in zip(models, ss))
            raise InputError(f"tensor {name} has different shapes: {desc}; these models cannot be merged")
        if not truncate_vocab:
            desc = ", ".join(f"{m.ref} {s[0]}" for m, s in zip(models, ss))
            raise InputError(f"vocabulary sizes differ in {name} ({desc}): give the models one tokenizer, "
                             "or set unsafe_truncate_embeddings (--unsafe-truncate-embeddings) to keep "
                             "the common first rows (only if token ids agree there)")
        rows = min(s[0] for s in ss)
        shapes[name] = (rows, *ss[0][1:])
        cut = rows if cut is None else min(cut, rows)
    return shapes, cut
