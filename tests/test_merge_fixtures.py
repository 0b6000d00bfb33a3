"""Small input models for the merge tests: a random tiny Qwen2 base and variants of it whose
weights are the base's plus seeded noise, so that task vectors are meaningful."""

from __future__ import annotations

import shutil
from pathlib import Path


def make_variants(root: Path, n: int = 3, scale: float = 0.02, vocab_cut: int | None = None) -> dict[str, Path]:
    """{'base': dir, 'v0': dir, ...}; each variant differs from the base by scale * N(0, 1) noise
    on every tensor (a different amount per variant, so weights and densities matter)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from rdistill.toy.model import tiny_test_model
    base = root / "base"
    if not (base / "model.safetensors").exists():
        tiny_test_model(base, seed=0)
    sd = load_file(base / "model.safetensors")
    out = {"base": base}
    for i in range(n):
        d = root / f"v{i}"
        if not (d / "model.safetensors").exists():
            shutil.copytree(base, d, dirs_exist_ok=True)
            g = torch.Generator().manual_seed(100 + i)
            save_file({k: v + scale * (1 + i) * torch.randn(v.shape, generator=g) for k, v in sd.items()},
                      d / "model.safetensors", metadata={"format": "pt"})
        out[f"v{i}"] = d
    if vocab_cut:
        d = root / "short_vocab"
        if not d.exists():
            shutil.copytree(out["v0"], d)
            sd0 = load_file(d / "model.safetensors")
            sd0["model.embed_tokens.weight"] = sd0["model.embed_tokens.weight"][:-vocab_cut].clone()
            save_file(sd0, d / "model.safetensors", metadata={"format": "pt"})
            cfg = json.loads((d / "config.json").read_text())
            cfg["vocab_size"] -= vocab_cut
            (d / "config.json").write_text(json.dumps(cfg))
        out["short_vocab"] = d
    return out
