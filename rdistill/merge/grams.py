"""RegMean's statistics: per linear layer of a model, the Gram matrix X^T X / n of the layer's
inputs over a sample of its domain's chat SFT rows (prompt and answer), in float32.

One collection loads a model once (Hugging Face transformers), renders and tokenizes the rows as
the SFT stage does, and accumulates every linear layer's Gram with forward hooks over the real
tokens (padding is masked out). Layers that take the same input (q/k/v, gate/up) share one
matrix: the first of them owns it, the others are aliases. A model whose matrices exceed the
memory budget is collected in several passes, each for a group of layers, the forward stopping
after the group's last layer. Only linear layers whose weight is a tensor of the checkpoint get
one (a tied LM head is the embedding, which RegMean averages).

Written as a folder: shards `grams-<k>.safetensors` and `grams.json` (where each matrix is,
the aliases, tokens and rows counted, and what the statistics were computed from).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

from rdistill.merge.regmean import INDEX, StatsError

_LAYER = re.compile(r"\.(\d+)\.")


class _Stop(Exception):
    """Raised by a hook to end a forward pass after the last layer a pass needs."""


# ---------------------------------------------------------------- rows

def load_rows(tok, data_path: str, settings) -> list[list[int]]:
    """Token ids of `settings.samples` rows drawn (seeded) from a chat SFT JSONL, rendered with
    the chat template and cut to `settings.max_tokens`."""
    from rdistill.data.chat_template import apply_chat_template_override
    from rdistill.data.sft import read_sft_jsonl
    recs = list(read_sft_jsonl([data_path]))
    if not recs:
        raise StatsError(f"regmean: the domain data {data_path} has no rows: RegMean needs the domain's inputs")
    apply_chat_template_override(tok, settings.chat_template)
    if not getattr(tok, "chat_template", None):
        raise StatsError(f"regmean: the tokenizer of {tok.name_or_path} has no chat template: set "
                         "merge.stats.chat_template")
    order = list(range(len(recs)))
    random.Random(settings.seed).shuffle(order)
    rows = []
    for i in order[: settings.samples]:
        text = tok.apply_chat_template(recs[i]["messages"], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"][: settings.max_tokens]
        if ids:
            rows.append(ids)
    return rows


def batches(rows: list[list[int]], batch_size: int, pad_id: int, device) -> list[tuple[Any, Any]]:
    """(input_ids, attention_mask) batches, right-padded, rows of similar length together."""
    import torch
    rows = sorted(rows, key=len, reverse=True)
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        out.append((ids.to(device), mask.to(device)))
    return out


# ---------------------------------------------------------------- hooks

class GramHooks:
    """Accumulates sum x^T x (float32) of the inputs of the given linear modules over the tokens
    where `mask` is set. On the first batch, a module whose input is the very tensor another
    module took (still alive: same storage, shape and stride) becomes that module's alias."""

    def __init__(self, modules: dict):
        self.sums: dict = {}
        self.mask = None
        self.aliases: dict[str, str] = {}
        self._first = True
        self._seen: dict = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0]
            if name in self.aliases:
                return
            if self._first:
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                prev = self._seen.get(key)
                if prev is not None and prev[1]() is x:
                    self.aliases[name] = prev[0]
                    return
                self._seen[key] = (name, weakref.ref(x))
            self.add(name, x)
        return hook

    def add(self, name: str, x) -> None:
        x = (x[self.mask.bool()] if self.mask is not None else x.reshape(-1, x.shape[-1])).float()
        xtx = x.T @ x
        if name in self.sums:
            self.sums[name].add_(xtx)
        else:
            self.sums[name] = xtx

    def end_batch(self) -> None:
        """After the first batch: aliases are known, their hooks go."""
        if self._first:
            self._first = False
            self._seen.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- layout and writing

def linear_modules(model, tensor_names: set[str]) -> dict:
    """{module name: nn.Linear} of the linear layers whose weight is a checkpoint tensor."""
    import torch.nn as nn
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in tensor_names}


def decoder_layers(model):
    """(prefix, ModuleList) of the decoder layers: the module list as long as num_hidden_layers."""
    import torch.nn as nn
    cfg = model.config.get_text_config()
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == cfg.num_hidden_layers:
            return name, m
    raise StatsError(f"regmean: no list of {cfg.num_hidden_layers} decoder layers in {type(model).__name__}")


def layer_groups(modules: dict, prefix: str, budget: float) -> list[list[str]]:
    """Module names in groups of whole layers whose Grams (float32, in x in) fit `budget` bytes;
    modules outside the layers (an LM head) go with the last group."""
    per_layer: dict[int, list[str]] = {}
    tail = []
    for n in modules:
        m = _LAYER.match(n[len(prefix):]) if n.startswith(prefix + ".") else None
        (per_layer.setdefault(int(m.group(1)), []) if m else tail).append(n)
    groups, size = [[]], 0.0
    for i in sorted(per_layer):
        b = sum(4.0 * modules[n].in_features ** 2 for n in per_layer[i])
        if groups[-1] and size + b > budget:
            groups.append([])
            size = 0.0
        groups[-1] += per_layer[i]
        size += b
    groups[-1] += tail
    return groups


class StatsWriter:
    """Shards of averaged Grams (float32) written as they come, and the index at the end; the
    folder is built aside and renamed into place, so a folder with an index is complete."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.tmp = self.folder.parent / f".{self.folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.where: dict[str, str] = {}

    def add(self, grams: dict) -> None:
        from safetensors.torch import save_file
        fname = f"grams-{len(set(self.where.values())):05d}.safetensors"
        save_file({n: g.detach().float().cpu().contiguous() for n, g in grams.items()}, str(self.tmp / fname))
        self.where.update({n: fname for n in grams})

    def finish(self, aliases: dict, tokens: int, rows: int, about: dict) -> None:
        (self.tmp / INDEX).write_text(json.dumps({"grams": self.where, "aliases": aliases, "tokens": tokens,
                                                  "rows": rows, "about": about}, indent=1, sort_keys=True))
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.tmp, self.folder)


def load_model(model_dir: str, device: str):
    """Model and tokenizer, eval mode, in the checkpoint's dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    return model, tok


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def compute_device(device: str) -> str:
    import torch
    return "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- one model (RegMean)

def collect(model_dir: str, data_path: str, settings, folder: str, tensor_names: list[str],
            device: str = "cpu", about: Optional[dict] = None) -> dict:
    """Collect one model's Grams on its domain's rows into `folder` (a Ray task, or a call).
    Returns counts."""
    import time

    import torch
    t0 = time.time()
    dev = compute_device(device)
    model, tok = load_model(model_dir, dev)
    rows = load_rows(tok, data_path, settings)
    data = batches(rows, settings.batch_size, pad_id(tok), dev)
    modules = linear_modules(model, set(tensor_names))
    prefix, layers = decoder_layers(model)
    decoder = model.get_decoder()
    groups = layer_groups(modules, prefix, settings.memory_gb * 1e9)
    heads = [n for n in modules if not n.startswith(prefix + ".")]  # inputs: the decoder's output
    writer, aliases, tokens = StatsWriter(folder), {}, 0
    with torch.no_grad():
        for group in groups:
            hooks = GramHooks({n: modules[n] for n in group if n not in heads})
            last = max((int(_LAYER.match(n[len(prefix):]).group(1)) for n in group if n not in heads), default=-1)
            stop = None
            if not any(n in heads for n in group) and last + 1 < len(layers):
                def raise_stop(*_):
                    raise _Stop
                stop = layers[last].register_forward_hook(raise_stop)
            tokens = 0
            for ids, mask in data:
                hooks.mask = mask
                tokens += int(mask.sum())
                try:
                    out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                    for n in group:
                        if n in heads:
                            hooks.add(n, out.last_hidden_state)
                except _Stop:
                    pass
                hooks.end_batch()
            hooks.remove()
            if stop is not None:
                stop.remove()
            aliases.update(hooks.aliases)
            writer.add({n: g / tokens for n, g in hooks.sums.items()})
    writer.finish(aliases, tokens, len(rows), {**(about or {}), "model": model_dir, "data": data_path})
    return {"folder": folder, "tokens": tokens, "rows": len(rows), "passes": len(groups),
            "seconds": round(time.time() - t0, 2)}
