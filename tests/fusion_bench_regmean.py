"""fusion-bench as the oracle of RegMean and RegMean++, run in the side environment of
tests/fusion_bench_oracle.py (`side_env()`): fusion-bench 0.2.33 over the project's torch and
transformers.

`run_regmean_oracle(jobs)` runs this file as a subprocess. Each job names HF model directories
(tiny Qwen2s), the token ids of each model's domain rows (a safetensors file per model, one
(rows, tokens) tensor, no padding), the batch size, alpha, the dtype fusion-bench computes in,
and where to write the merged state dict:
- regmean: fusion-bench's `regmean_merging` (its hooks on every nn.Linear, its running average
  of X^T X over tokens, its `merging_with_regmean_weights`), with stand-in trainers that hand it
  the batches.
- regmean_plusplus: fusion-bench's `RegMeanAlgorithmPlusPlus.run` (layer by layer through the
  merged model), with its CLIP subclass's `get_regmean_weights` (the hooks), and the few
  model-specific methods fusion-bench leaves to subclasses written here for Qwen2: embeddings
  and final norm averaged (as its CLIP subclass averages what precedes the layers), layer 0's
  input from the merged embeddings, each layer run with causal attention and rotary positions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_regmean_oracle(jobs: list[dict], timeout: int = 900) -> None:
    from fusion_bench_oracle import side_env
    env = {**os.environ, "PYTHONPATH": str(side_env()), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, __file__, json.dumps(jobs)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"fusion-bench oracle failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"


# ---------------------------------------------------------------- the side environment's half

def _models(job):
    from transformers import AutoModelForCausalLM
    return [AutoModelForCausalLM.from_pretrained(d, dtype=job.get("dtype", "float32"),
                                                 attn_implementation="sdpa").eval() for d in job["models"]]


def _ids(job):
    from safetensors.torch import load_file
    return [load_file(p)["input_ids"] for p in job["ids"]]


def _regmean(job) -> dict:
    from fusion_bench.method.regmean.regmean import regmean_merging

    class Trainer:  # what regmean_merging asks of a transformers Trainer
        def __init__(self, ids, bs):
            self.ids, self._train_batch_size = ids, bs

        def get_train_dataloader(self):
            return [{"input_ids": self.ids[s:s + self._train_batch_size]}
                    for s in range(0, len(self.ids), self._train_batch_size)]

        def _prepare_inputs(self, inputs):
            return inputs
    ids = _ids(job)
    return regmean_merging(_models(job), [Trainer(x, job["batch_size"]) for x in ids], [],
                           [len(x) for x in ids], job["ratio"])


def _regmean_plusplus(job) -> dict:
    import types

    import torch
    from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool
    models = _models(job)
    ids = _ids(job)
    bs = job["batch_size"]
    names = [f"m{i}" for i in range(len(models))]

    class Pool(BaseModelPool):
        def load_train_dataset(self, name, *a, **k):
            x = ids[names.index(name)]
            return [x[s:s + bs] for s in range(0, len(x), bs)]

    class QwenPlusPlus(RegMeanAlgorithmPlusPlus):
        get_regmean_weights = RegMeanAlgorithmForCLIPPlusPlus.get_regmean_weights
        fabric = types.SimpleNamespace(setup=lambda m: m)

        def merge_embedding_layer(self, models_to_merge_dict):
            out = {}
            for key in ("model.embed_tokens.weight", "model.norm.weight"):
                out[key] = torch.stack([m.state_dict()[key] for m in models_to_merge_dict.values()]).mean(dim=0)
            return out

        def get_input_for_first_layer(self, model, train_dataset):
            self.rotary = model.model.rotary_emb
            return [model.model.embed_tokens(b).detach() for b in train_dataset]

        def get_layers(self, model):
            return model.model.layers

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            for k, v in new_merged_params.items():
                merged_params_dict[f"model.layers.{layer_idx}.{k}"] = v
            return merged_params_dict

        def layer_batches_forward(self, layer, batches_input):
            out = []
            for h in batches_input:
                pos = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
                y = layer(h, attention_mask=None, position_ids=pos, position_embeddings=self.rotary(h, pos))
                out.append((y[0] if isinstance(y, tuple) else y).detach())
            return out

    pretrained = _models(job)[0]
    algo = QwenPlusPlus(num_regmean_examples=sum(len(x) for x in ids), exclude_param_names_regex=[],
                        reduce_non_diagonal_ratio=job["ratio"], weight_transpose=True)
    pool = Pool({"_pretrained_": pretrained, **dict(zip(names, models))})
    with torch.no_grad():
        merged = algo.run(pool)
    return merged.state_dict()


if __name__ == "__main__":
    import contextlib
    import io

    from safetensors.torch import save_file
    for j in json.loads(sys.argv[1]):
        with contextlib.redirect_stdout(io.StringIO()):
            sd = (_regmean if j["method"] == "regmean" else _regmean_plusplus)(j)
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, j["out"])
        Path(j["out"] + ".done").write_text("ok")
    print("done")
