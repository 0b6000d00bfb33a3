"""The statistics a merge step needs before its tensors merge (RegMean's Gram matrices): which
domain data each model is measured on, where the statistics live, whether earlier ones can be
reused, and the Ray tasks that collect the missing ones.

A folder of statistics is named by a hash of everything it depends on: the model's weights
(config and safetensors files' sizes and modification times), the data file's content, the row
sampling and chat template, and for RegMean++ also every other model and the step's parameters
(its Grams are taken on the merge built so far). A folder with its index is complete and is
reused, here or in a folder listed in `Options.stats_from` (the previous run's merge stage).
RegMean's collection is one task per model, each loading its model once; RegMean++'s is one
sequential task for the whole step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from rdistill.errors import expected_error
from rdistill.merge.plan import MergeStep, PlanError
from rdistill.merge.regmean import INDEX, StatsError, forget_open_files
from rdistill.rundir import file_hash


def settings_of(step: MergeStep, opts=None):
    """The step's statistics settings, else the options', else the defaults."""
    from rdistill.config import MergeStatsConfig
    return step.stats or getattr(opts, "stats", None) or MergeStatsConfig()


def data_paths(step: MergeStep, data_for: Optional[Callable[[str], Optional[str]]]) -> list[str]:
    """Each non-base model's domain data (its `data`, else `data_for(ref)`), checked to exist:
    one line naming the model without any."""
    out = []
    for i, m in enumerate(step.others):
        path = m.data or (data_for(m.model) if data_for else None)
        if not path:
            raise PlanError(f"{step.merge_method} needs domain data for model {m.model}: set models[{i}].data "
                            "to the chat SFT JSONL of its domain (RegMean measures each model's layer inputs on it)")
        if not Path(path).is_file():
            raise PlanError(f"{step.merge_method}: domain data {path} of model {m.model} not found")
        out.append(str(Path(path).absolute()))
    return out


def check_data(steps: list[MergeStep], data_for=None) -> None:
    """Every statistics step has its data: called before any step runs."""
    from rdistill.merge.methods import METHODS
    for s in steps:
        if METHODS[s.merge_method].stats:
            data_paths(s, data_for)


def _model_id(path: str) -> dict:
    d = Path(path)
    files = sorted(p for p in d.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    return {"path": str(d.absolute()), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _complete(folder: Path) -> bool:
    return (folder / INDEX).is_file()


def _reuse(folder: Path, elsewhere: list[str]) -> bool:
    """The folder is complete here, or copied (hard links where possible) from elsewhere."""
    if _complete(folder):
        return True
    for root in elsewhere:
        src = Path(root) / folder.parent.name / folder.name if folder.parent.name.startswith("pp-") \
            else Path(root) / folder.name
        if _complete(src):
            tmp = folder.parent / f".{folder.name}.copy-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)

            def link(a, b):
                try:
                    os.link(a, b)
                except OSError:
                    shutil.copy2(a, b)
            shutil.copytree(src, tmp, copy_function=link)
            os.replace(tmp, folder)
            return True
    return False


def _run_tasks(calls: list[tuple[Callable, tuple, dict]], in_process: bool, device: str) -> list:
    """The calls in this process, one after another, or as Ray tasks at once."""
    if in_process:
        return [fn(*a, **kw) for fn, a, kw in calls]
    import ray

    from rdistill.topology import stats_task_options
    refs = [ray.remote(fn).options(**stats_task_options(device)).remote(*a, **kw) for fn, a, kw in calls]
    try:
        return ray.get(refs)
    except Exception as e:  # a task's expected failure: its one line, not Ray's traceback
        err = expected_error(e)
        if err is not None:
            raise err from None
        raise


def ensure(step: MergeStep, models: list, opts, stats_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    """Folders of statistics of the step's models (InputModels, in the method's order),
    collected when missing; checked against the models' weights."""
    from rdistill.merge.methods import METHODS
    kind = METHODS[step.merge_method].stats
    st = settings_of(step, opts)
    datas = data_paths(step, opts.data_for)
    sampled = {"samples": st.samples, "max_tokens": st.max_tokens, "seed": st.seed, "chat_template": st.chat_template}
    ids = [{"model": _model_id(m.path), "data": file_hash(p)} for m, p in zip(models, datas)]
    names = sorted({n for m in models for n in m.tensors})
    stats_dir.mkdir(parents=True, exist_ok=True)
    if kind == "regmean":
        folders = [stats_dir / f"rm-{_key({'kind': kind, **i, **sampled})}" for i in ids]
        todo = [k for k, f in enumerate(folders) if not _reuse(f, opts.stats_from)]
        from rdistill.merge.grams import collect
        calls = [(collect, (models[k].path, datas[k], st, str(folders[k]), names, opts.device),
                  {"about": {"key": ids[k], "sampled": sampled}}) for k in todo]
    else:
        params = {"parameters": step.parameters, "models": [m.parameters for m in step.others], "dtype": step.dtype}
        root = stats_dir / f"pp-{_key({'kind': kind, 'models': ids, **sampled, **params})}"
        root.mkdir(exist_ok=True)
        folders = [root / f"m{k}" for k in range(len(models))]
        done = all([_reuse(f, opts.stats_from) for f in folders])
        todo = [] if done else list(range(len(models)))
        from rdistill.merge.regmean_pp import collect_plusplus
        calls = [] if done else [(collect_plusplus, (step, [m.path for m in models], datas, st,
                                                     [str(f) for f in folders], names, opts.device),
                                  {"about": {"models": ids, "sampled": sampled, **params}})]
    if todo:
        import time
        t0 = time.time()
        log(f"{step.name} ({step.merge_method}): collecting input statistics of {len(todo)} model(s) "
            f"on {st.samples} rows each")
        _run_tasks(calls, opts.in_process, opts.device)
        forget_open_files()
        log(f"{step.name} ({step.merge_method}): input statistics collected in {time.time() - t0:.1f}s into {stats_dir}")
    else:
        log(f"{step.name} ({step.merge_method}): input statistics reused from {stats_dir}")
    check_shapes([str(f) for f in folders], models)
    return [str(f) for f in folders]


def check_shapes(folders: list[str], models: list) -> None:
    """Every Gram is in x in for the weight it serves (read from the headers only)."""
    from rdistill.merge.st_io import read_header
    weights = models[0].tensors
    for folder in folders:
        idx = json.loads((Path(folder) / INDEX).read_text())
        headers = {f: read_header(Path(folder) / f)[0] for f in set(idx["grams"].values())}
        for mod, f in idx["grams"].items():
            shape = tuple(headers[f][mod]["shape"])
            w = weights.get(f"{mod}.weight")
            if w is None or len(w.shape) != 2 or shape != (w.shape[1], w.shape[1]):
                raise StatsError(f"input statistics {folder}: the Gram of {mod} is {shape}, but the model's "
                                 f"{mod}.weight is {None if w is None else tuple(w.shape)}; delete the folder "
                                 "to collect them again")
