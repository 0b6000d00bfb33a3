"""RegMean++'s statistics: each layer's Gram matrices taken on the merge built so far.

RegMean measures a layer's inputs in each branch on its own: the inputs of branch i's layer l
come from branch i's layers 0..l-1. But the merged model feeds layer l with the *merged*
layers' outputs, and the mismatch grows with depth. RegMean++ (as fusion-bench runs it) merges
layer by layer: the embeddings are averaged, each domain's rows are embedded by the merged
model, then for l = 0, 1, ...: branch i's layer l runs on domain i's current hidden states (its
linear layers' inputs give G_i^l), layer l is merged with the closed form, and the merged
layer maps every domain's hidden states to the next layer's inputs. An untied LM head gets its
Grams from the complete merged decoder's output.

This is sequential by nature: one task holds the merged model, one branch layer at a time (read
from the checkpoints tensor by tensor) and every domain's hidden states. It writes the Grams, one
folder per model like RegMean's, and the merge itself then streams tensor by tensor from them,
computing the same closed form (rdistill.merge.regmean) on the same inputs.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Optional

import torch
import torch.nn as nn

from rdistill.merge.grams import (GramHooks, StatsWriter, batches, compute_device, decoder_layers,
                                  linear_modules, load_model, load_rows, pad_id)
from rdistill.merge.regmean import module_of, solve, weighted_mean


class _Recorder(nn.Module):
    """Stands in for a decoder layer for one forward: keeps its hidden input (layer 0's is the
    merged embeddings' output) and its keyword arguments (masks, rotary embeddings)."""

    def __init__(self, store: list, first: bool):
        super().__init__()
        self.store, self.first = store, first

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        self.store.append((h if self.first else None, kwargs))
        return h


def _layer_inputs(model, prefix: str, n_layers: int, data: list) -> list[tuple[Any, list[dict]]]:
    """Per batch: layer 0's input and every layer's keyword arguments, from one forward of the
    decoder with its layers replaced by recorders (so none of them runs)."""
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    real = getattr(parent, attr)
    out = []
    try:
        for ids, mask in data:
            store: list = []
            setattr(parent, attr, nn.ModuleList([_Recorder(store, i == 0) for i in range(n_layers)]))
            with torch.no_grad():
                model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
            out.append((store[0][0], [kw for _, kw in store]))
    finally:
        setattr(parent, attr, real)
    return out


def _hidden(out):
    """A decoder layer's hidden states (a tensor, or the first item of older versions' tuples)."""
    return out[0] if isinstance(out, tuple) else out


def _params(step, name: str, n_layers: int) -> tuple[float, list[float]]:
    from rdistill.merge.plan import tensor_parameters
    shared, per = tensor_parameters(step, name, n_layers)
    return float(shared["reduce_non_diagonal_ratio"]), [float(p["weight"]) for p in per]


def collect_plusplus(step, model_dirs: list[str], data_paths: list[str], settings, folders: list[str],
                     tensor_names: list[str], device: str = "cpu", about: Optional[dict] = None) -> dict:
    """Merge layer by layer in memory, writing each model's Grams into its folder (one task)."""
    from rdistill.merge.st_io import model_tensors, read_tensor
    t0 = time.time()
    dev = compute_device(device)
    merged, _ = load_model(model_dirs[0], dev)
    cdtype = getattr(torch, step.dtype) if step.dtype else None
    locs = [model_tensors(d) for d in model_dirs]
    handles: dict = {}

    def read(i: int, name: str) -> torch.Tensor:
        x = read_tensor(locs[i][name], handles)
        return x.to(device=dev, dtype=cdtype or x.dtype)
    n_layers = merged.config.get_text_config().num_hidden_layers
    prefix, layers = decoder_layers(merged)
    modules = linear_modules(merged, set(tensor_names))
    heads = [n for n in modules if not n.startswith(prefix + ".")]
    params = dict(merged.named_parameters())

    def put(name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
    # 1. outside the layers: the weighted mean (an untied LM head waits for its Grams)
    for name in tensor_names:
        if not name.startswith(prefix + ".") and module_of(name) not in heads and name in params:
            put(name, weighted_mean([read(i, name) for i in range(len(model_dirs))], _params(step, name, n_layers)[1]))
    # 2. each domain's rows through the merged embeddings
    domains = []
    for i, (d, p) in enumerate(zip(model_dirs, data_paths)):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(d)
        rows = load_rows(tok, p, settings)
        data = batches(rows, settings.batch_size, pad_id(tok), dev)
        domains.append({"data": data, "rows": len(rows), "tokens": sum(int(m.sum()) for _, m in data),
                        "inputs": _layer_inputs(merged, prefix, n_layers, data)})
    writers = [StatsWriter(f) for f in folders]
    aliases: list[dict] = [{} for _ in folders]
    # 3. layer by layer: Grams of each branch's layer on its domain's merged-prefix inputs, merge, forward
    with torch.no_grad():
        for li, layer in enumerate(layers):
            lp = f"{prefix}.{li}."
            names = [n for n in tensor_names if n.startswith(lp)]
            grams = []
            for i, dom in enumerate(domains):
                scratch = copy.deepcopy(layer)
                own = dict(scratch.named_parameters())
                for n in names:
                    if n[len(lp):] in own:  # (a buffer saved with the weights is the same in every model)
                        own[n[len(lp):]].copy_(read(i, n))
                hooks = GramHooks(linear_modules(scratch, {x[len(lp):] for x in names}))
                for (h, kws), (_, mask) in zip(dom["inputs"], dom["data"]):
                    hooks.mask = mask
                    scratch(h, **kws[li])
                    hooks.end_batch()
                hooks.remove()
                g = {lp + n: s / dom["tokens"] for n, s in hooks.sums.items()}
                aliases[i].update({lp + a: lp + o for a, o in hooks.aliases.items()})
                writers[i].add(g)
                grams.append(g)
                del scratch
            for n in (n for n in names if n in params):
                ratio, coefs = _params(step, n, n_layers)
                xs = [read(i, n) for i in range(len(domains))]
                mod = module_of(n)
                owner = aliases[0].get(mod, mod)
                if owner in grams[0] and xs[0].dim() == 2:
                    put(n, solve(xs, [g[owner] for g in grams], ratio, coefs, n))
                else:
                    put(n, weighted_mean(xs, coefs))
            for dom in domains:
                dom["inputs"] = [(_hidden(layer(h, **kws[li])), kws) for h, kws in dom["inputs"]]
        # 4. an untied LM head: Grams of the merged decoder's output
        if heads:
            grams = []
            for i, dom in enumerate(domains):
                hooks = GramHooks({})
                for ids, mask in dom["data"]:
                    hooks.mask = mask
                    hidden = merged.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    for n in heads:
                        hooks.add(n, hidden)
                g = {n: s / dom["tokens"] for n, s in hooks.sums.items()}
                writers[i].add(g)
                grams.append(g)
    for i, (w, dom) in enumerate(zip(writers, domains)):
        w.finish(aliases[i], dom["tokens"], dom["rows"],
                 {**(about or {}), "model": model_dirs[i], "data": data_paths[i], "method": "regmean_plusplus"})
    return {"folders": folders, "tokens": [d["tokens"] for d in domains], "layers": n_layers,
            "seconds": round(time.time() - t0, 2)}

