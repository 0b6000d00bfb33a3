"""Resolution of model and data references used in configs.

`toy:teacher`, `toy:base`   the toy world's models (built by the toy stage into the run dir)
`toy:<domain>/<split>`      the toy world's prompt files
`base`                      the student base (`student.base`)
`branch:<domain>`           the branch student trained for that domain in this run
`merge:<candidate>/<step>`  a merge step's output in this run (`merge:<candidate>` = its last step)
`merged`                    the run's chosen merge (picked by the evaluate stage on dev, or the only one)
`mixture`                   the data-mixture baseline (one student on every domain's SFT set)
`distilled`                 the distill stage's model (the merge distilled on-policy from the branches)
anything else               a local path, or a Hugging Face model id passed through unchanged
"""

from __future__ import annotations

import json
from pathlib import Path

from rdistill.config.fields import ConfigError
from rdistill.rundir import RunDir

MIXTURE = "mixture"  # the data-mixture baseline: train/mixture, and its model reference
DISTILLED = "distilled"  # the distill stage's model: distill/model, and its model reference
DISTILLED_ROW = "merge+distill"  # its row in the evaluation table


def resolve_model(ref: str, run: RunDir, student_base: str | None = None) -> str:
    """A path (or HF id) for a model reference; raises ConfigError when it cannot exist."""
    if ref == "base":
        if student_base is None or student_base == "base":
            raise ConfigError("model reference 'base' needs student.base to be set")
        return resolve_model(student_base, run)
    kind, _, name = ref.partition(":")
    if ref == "merged":
        return str(chosen_merge(run))
    if kind == "toy" and name in ("teacher", "base"):
        return str(run.stage_dir("toy") / "models" / name)
    if kind == "branch" and name:
        return str(run.stage_dir("train") / name)
    if ref == MIXTURE:
        return str(run.stage_dir("train") / MIXTURE)
    if ref == DISTILLED:
        return str(run.stage_dir("distill") / "model")
    if kind == "merge" and name:
        cand, _, step = name.partition("/")
        root = run.stage_dir("merge") / cand
        if not step:
            return str(root / "final")
        return str(root / step)
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")):
        return str(path.absolute())
    return ref  # a Hugging Face model id


def producing_stage(ref: str) -> str | None:
    """The stage of this run that makes a model or source reference (None: it exists outside the
    run): toy:... the toy stage, branch:<d> and mixture the train stage, merge:... the merge."""
    kind = ref.partition(":")[0]
    return {"toy": "toy", "branch": "train", "merge": "merge"}.get(kind) or \
        ("train" if ref == MIXTURE else "merge" if ref == "merged" else "distill" if ref == DISTILLED else None)


def toy_inputs(cfg) -> list[str]:
    """["toy"] when the config uses the toy world (a toy: model or source), else []: the toy
    stage is then an input like any other stage."""
    refs = [cfg.teacher.model, cfg.student.base, getattr(cfg.teacher, "tokenizer", None) or ""]
    for d in cfg.domains.values():
        srcs = [d.train, d.dev, d.test, *d.extra_train, *getattr(d, "extra_test", [])]
        refs += [s.path or "" for s in srcs if s is not None]
    return ["toy"] if any(r.startswith("toy:") for r in refs) else []


def resolve_source_path(path: str, run: RunDir) -> str:
    """`toy:<domain>/<split>` -> the toy stage's JSONL file; other paths unchanged."""
    if path.startswith("toy:"):
        domain, _, split = path[4:].partition("/")
        return str(run.stage_dir("toy") / "data" / domain / f"{split or 'train'}.jsonl")
    return str(Path(path).expanduser().absolute())


def merge_selection(run: RunDir) -> dict | None:
    """Which merge is the run's merge, in one place: the evaluate stage's dev-split choice (with
    every candidate's dev scores), else the merge stage's default (its first candidate)."""
    for stage in ("evaluate", "merge"):
        sel = run.stage_dir(stage) / "selection.json"
        if sel.exists():
            return json.loads(sel.read_text())
    return None


def chosen_merge(run: RunDir) -> Path:
    """The directory of the run's merge (see merge_selection)."""
    sel = merge_selection(run)
    if sel is None:
        raise ConfigError(f"no merged model in {run.root}: run the merge stage first (stages=[merge])")
    return run.root / sel["path"]  # stored relative to the run
