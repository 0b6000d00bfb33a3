"""The `toy` stage: writes the toy world's prompt files and its teacher and student base.

    <run_dir>/toy/data/<domain>/{train,dev,test}.jsonl   prompt records (rdistill.toy.domains)
    <run_dir>/toy/models/{teacher,base}/                 HF model directories

The prompt files are generated from `toy` (seed, n_train, n_dev, n_test). The models are the
ones shipped in the package (rdistill/toy/assets) unless `toy.rebuild` is set or `toy.seed`
differs from the seed they were built with; then they are built from scratch through the
project's training code, once per recipe (cached under ~/.cache/rdistill/toy/<hash>).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rdistill.config import ToyConfig
from rdistill.config.fields import ConfigError
from rdistill.log import log
from rdistill.toy.domains import DOMAINS, SPLITS, records
from rdistill.stage_api import Stage

MODELS = ("teacher", "base")


def write_data(out: Path, toy: ToyConfig) -> dict[str, int]:
    """Write every domain's splits as JSONL; returns row counts like {"math/test": 100}."""
    counts: dict[str, int] = {}
    sizes = {"train": toy.n_train, "dev": toy.n_dev, "test": toy.n_test}
    for d in DOMAINS:
        (out / d).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            rows = records(d, split, sizes[split], toy.seed)
            (out / d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            counts[f"{d}/{split}"] = len(rows)
    return counts


def model_source(toy: ToyConfig) -> tuple[Path, str]:
    """Where the teacher and base come from: the shipped assets, or a (cached) build."""
    from rdistill.toy.build import ASSETS, cached_build, recipe_for, shipped_recipe
    shipped = ASSETS / "recipe.json"
    if not toy.rebuild and shipped.exists() and shipped_recipe()["recipe"]["seed"] == toy.seed:
        missing = [m for m in MODELS if not (ASSETS / m / "config.json").exists()]
        if missing:
            raise ConfigError(f"the shipped toy models are incomplete ({', '.join(missing)} missing in "
                              f"{ASSETS}): reinstall rdistill or set toy.rebuild=true")
        return ASSETS, "shipped"
    why = "toy.rebuild=true" if toy.rebuild else f"toy.seed={toy.seed} differs from the shipped models'"
    log.info("toy: building teacher and base from scratch (%s); this takes a long time on a CPU", why)
    return cached_build(recipe_for(toy.seed)), "built"


def run(ctx) -> dict:
    toy = ctx.cfg.toy
    counts = write_data(ctx.out / "data", toy)
    src, how = model_source(toy)
    for m in MODELS:
        shutil.copytree(src / m, ctx.out / "models" / m,
                        ignore=shutil.ignore_patterns("metrics.jsonl", "*.tmp*"))
    shutil.copy(src / "recipe.json", ctx.out / "models" / "recipe.json")
    info = json.loads((src / "recipe.json").read_text())
    log.info("toy: %s teacher and base (%s params each), %d prompt files", how, info.get("params"),
             len(counts))
    return {"models": how, "model_hash": info.get("hash"), "params": info.get("params"),
            "rows": sum(counts.values()), **{f"rows/{k}": v for k, v in counts.items()}}


# Reads the toy section only (it writes every toy domain's files, whatever the domains are).
STAGE = Stage("toy", run, reads=("toy",))
