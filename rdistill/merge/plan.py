"""Merge plans: one step is a mergekit-style configuration (models, merge_method, base_model,
parameters, dtype, out_dtype); a plan is a list of steps, each one's output feeding later ones.

Parameter values follow mergekit's syntax: a scalar; a list of numbers, a gradient interpolated
over the layers (t = layer / (layers - 1), 0 for tensors outside the layers); or a list of
`{filter: substring, value: ...}` conditions, the first whose filter is in the tensor name wins.
Per-model parameters override the step's `parameters`.

mergekit's `slices:` form is taken where it describes the same layers as `models:` with
parameters per slice: every source of a slice spans the same layers, every slice merges the
same models, and the slices follow one another from layer 0 to the last. A gradient then runs
over each slice's own layers, and a slice's and its sources' parameters come before the step's
(mergekit's order). Layer stacking (sources of different layers, passthrough frankenmerges) is
refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rdistill.config.fields import DTYPES
from rdistill.errors import ConfigError
from rdistill.merge.methods import METHODS

if TYPE_CHECKING:
    from rdistill.config import MergeStepConfig

_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
# mergekit keys this implementation does not take: say so rather than silently ignore them
_UNSUPPORTED = ("modules", "tokenizer", "tokenizer_source", "chat_template")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class PlanError(ConfigError):
    """A merge plan is invalid; the message is one line naming the key and the fix."""


@dataclass
class ModelInput:
    model: str
    parameters: dict = field(default_factory=dict)
    data: Optional[str] = None
    """Chat SFT JSONL of the model's domain (regmean, regmean_plusplus: its layers' inputs)."""


@dataclass
class Slice:
    """One of mergekit's `slices`: layers [start, end) of every model, with its own parameters."""
    start: int
    end: int
    parameters: dict = field(default_factory=dict)
    per_model: dict = field(default_factory=dict)
    """Each source's own parameters, by model reference."""


@dataclass
class MergeStep:
    merge_method: str
    models: list[ModelInput]
    base_model: Optional[str] = None
    parameters: dict = field(default_factory=dict)
    dtype: Optional[str] = None
    """Compute dtype (None: the inputs' promoted dtype, as mergekit does)."""
    out_dtype: Optional[str] = None
    """Written dtype (None: dtype, else the method's result dtype)."""
    name: str = "merged"
    stats: Any = None
    """How input statistics are collected (a MergeStatsConfig; None: its defaults)."""
    slices: Optional[list[Slice]] = None
    """mergekit's `slices:` (None: `models:`, every layer with the step's parameters)."""

    @property
    def others(self) -> list[ModelInput]:
        """The non-base models, in listed order (linear: every model; its base is ignored)."""
        if METHODS[self.merge_method].base == "ignored":
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    @property
    def inputs(self) -> list[str]:
        """Model references in the order the method sees them: base first, then the others."""
        spec = METHODS[self.merge_method]
        head = [self.base_model] if spec.base == "required" else []
        return head + [m.model for m in self.others]


def _dtype(value: Any, key: str) -> Optional[str]:
    if value is None:
        return None
    v = _ALIASES.get(str(value), str(value))
    if v not in DTYPES:
        raise PlanError(f"{key}={value!r} is invalid: use one of {', '.join(DTYPES)}")
    return v


def step_from_dict(d: dict, name: str = "merged") -> MergeStep:
    """A step from a mergekit YAML mapping (or the same keys from a MergeStepConfig)."""
    if not isinstance(d, dict):
        raise PlanError(f"a merge plan must be a mapping with merge_method and models, got {type(d).__name__}")
    bad = [k for k in _UNSUPPORTED if d.get(k)]
    if bad:
        raise PlanError(f"{bad[0]} is not supported by rdistill's merge: use models/base_model (the "
                        "tokenizer and chat template are copied from the base model, else the first model)")
    unknown = set(d) - {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "name",
                        "stats"}
    if unknown:
        raise PlanError(f"unknown merge plan key(s) {sorted(unknown)}: allowed are merge_method, models, "
                        "base_model, parameters, dtype, out_dtype, stats")
    method = d.get("merge_method")
    if method == "passthrough":
        raise PlanError(f"merge_method=passthrough: {_STACKING} (rdistill merges models of the same layers)")
    if method not in METHODS:
        raise PlanError(f"merge_method={method!r} is invalid: allowed: {', '.join(METHODS)}")
    if d.get("slices") and d.get("models"):
        raise PlanError("give models or slices, not both")
    slices = _slices(d["slices"], d.get("base_model")) if d.get("slices") else None
    models = [ModelInput(r, dict(slices[0].per_model[r])) for r in slices[0].per_model] if slices else []
    for i, m in enumerate(d.get("models") or []):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or not m.get("model"):
            raise PlanError(f"models[{i}] needs a model: write '- model: PATH'")
        bad = set(m) - {"model", "parameters", "data"}
        if bad:
            raise PlanError(f"models[{i}]: unknown key(s) {sorted(bad)}: allowed are model, parameters, data")
        models.append(ModelInput(str(m["model"]), dict(m.get("parameters") or {}),
                                 str(m["data"]) if m.get("data") else None))
    step = MergeStep(method, models, d.get("base_model"), dict(d.get("parameters") or {}),
                     _dtype(d.get("dtype"), "dtype"), _dtype(d.get("out_dtype"), "out_dtype"),
                     d.get("name") or name, _stats(d.get("stats")), slices)
    check_step(step)
    return step


_STACKING = "layer stacking (passthrough, frankenmerges) is not supported"


def _slices(raw: Any, base: Optional[str]) -> list[Slice]:
    """mergekit's slices, each source of a slice spanning the same layers and every slice
    merging the same models; the order of the layers is checked against the models' count when
    they are read (check_slices)."""
    if not isinstance(raw, list):
        raise PlanError("slices must be a list of '- sources: [{model: PATH, layer_range: [START, END]}, ...]'")
    out = []
    for i, sl in enumerate(raw):
        if not isinstance(sl, dict) or not sl.get("sources"):
            raise PlanError(f"slices[{i}] needs sources: '- sources: [{{model: PATH, layer_range: [0, N]}}]'")
        bad = set(sl) - {"sources", "parameters", "base_model"}
        if bad:
            raise PlanError(f"slices[{i}]: unsupported key(s) {sorted(bad)}: allowed are sources, parameters")
        if sl.get("base_model") not in (None, base):
            raise PlanError(f"slices[{i}].base_model differs from base_model: one base per merge is supported")
        per, ranges = {}, set()
        for j, src in enumerate(sl["sources"]):
            if not isinstance(src, dict) or not src.get("model") or len(src.get("layer_range") or []) != 2:
                raise PlanError(f"slices[{i}].sources[{j}] needs model and layer_range: [START, END]")
            if set(src) - {"model", "layer_range", "parameters"}:
                raise PlanError(f"slices[{i}].sources[{j}]: unknown key(s) "
                                f"{sorted(set(src) - {'model', 'layer_range', 'parameters'})}")
            per[str(src["model"])] = dict(src.get("parameters") or {})
            ranges.add(tuple(int(x) for x in src["layer_range"]))
        if len(ranges) > 1:
            raise PlanError(f"slices[{i}]: its sources span different layers {sorted(ranges)}: {_STACKING}; "
                            "give every source of a slice the same layer_range")
        (start, end), = ranges
        if out and set(per) != set(out[0].per_model):
            raise PlanError(f"slices[{i}] merges other models than slices[0]: {_STACKING}")
        out.append(Slice(start, end, dict(sl.get("parameters") or {}), per))
    return out


def check_slices(step: MergeStep, num_layers: int) -> None:
    """The slices must follow one another over exactly the models' layers (no stacking)."""
    if not step.slices:
        return
    at = 0
    for i, sl in enumerate(step.slices):
        if sl.start != at or sl.end <= sl.start:
            raise PlanError(f"slices[{i}] covers layers [{sl.start}, {sl.end}) after layer {at}: {_STACKING}; "
                            f"the slices must follow one another from layer 0 to {num_layers}")
        at = sl.end
    if at != num_layers:
        raise PlanError(f"the slices end at layer {at} but the models have {num_layers}: {_STACKING}")


def _stats(value: Any):
    """A step's `stats` mapping as a checked MergeStatsConfig (None: the defaults)."""
    if value is None:
        return None
    import dataclasses

    from rdistill.config import MergeStatsConfig
    from rdistill.config.fields import check
    if isinstance(value, MergeStatsConfig):
        return value
    if not isinstance(value, dict):
        raise PlanError(f"stats must be a mapping (samples, max_tokens, ...), got {value!r}")
    allowed = [f.name for f in dataclasses.fields(MergeStatsConfig)]
    bad = set(value) - set(allowed)
    if bad:
        raise PlanError(f"stats: unknown key(s) {sorted(bad)}: allowed are {', '.join(allowed)}")
    out = MergeStatsConfig(**value)
    try:
        check(out, "stats.")
    except ConfigError as e:
        raise PlanError(str(e)) from None
    return out


def step_from_config(c: "MergeStepConfig") -> MergeStep:
    """A step from the pipeline's typed config (the Hydra merge.candidates[*].steps), field by
    field: the config already checked the method and dtypes against the same enums."""
    step = MergeStep(c.merge_method, [ModelInput(m.model, dict(m.parameters), m.data) for m in c.models],
                     c.base_model, dict(c.parameters), _dtype(c.dtype, "dtype"), _dtype(c.out_dtype, "out_dtype"),
                     c.name)
    check_step(step)
    return step


def check_step(step: MergeStep) -> None:
    if step.slices:  # each slice as the step it is for its layers (its parameters first)
        import dataclasses
        for sl in step.slices:
            check_step(dataclasses.replace(
                step, slices=None, parameters={**step.parameters, **sl.parameters},
                models=[ModelInput(r, dict(p)) for r, p in sl.per_model.items()]))
        return
    spec = METHODS[step.merge_method]
    m = step.merge_method
    if not step.models:
        raise PlanError(f"{m}: list at least one model under models")
    if spec.base == "required" and not step.base_model:
        raise PlanError(f"{m} needs base_model (the model the others' changes are measured from)")
    n = len(step.others)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.max_models == spec.min_models
                else f"at least {spec.min_models}")
        raise PlanError(f"{m} takes {want} model(s) besides base_model, got {n}")
    allowed = set(spec.shared) | set(spec.per_model)
    for where, params in [("parameters", step.parameters)] + \
            [(f"models[{i}].parameters", mi.parameters) for i, mi in enumerate(step.models)]:
        bad = set(params) - allowed
        if bad:
            raise PlanError(f"{where}: unknown parameter(s) {sorted(bad)} for {m}; allowed: "
                            f"{', '.join(sorted(allowed)) or 'none'}")
    for key, default in spec.shared.items():
        if default is None and key not in step.parameters:
            raise PlanError(f"{m} needs parameters.{key}")
    if spec.stats:
        _check_stats_params(step)
    else:
        given = [i for i, mi in enumerate(step.models) if mi.data]
        if given:
            raise PlanError(f"models[{given[0]}].data: {m} reads no domain data (only regmean and "
                            "regmean_plusplus do); remove it")
    for key, default in spec.per_model.items():
        for mi in step.others:
            if default is None and key not in mi.parameters and key not in step.parameters:
                raise PlanError(f"{m} needs {key} for model {mi.model}: set models[].parameters.{key} "
                                f"or parameters.{key}")


def _check_stats_params(step: MergeStep) -> None:
    """RegMean's numbers where they are plain: alpha in [0, 1], coefficients > 0 (a coefficient
    scales a Gram matrix, and the summed matrices must stay positive definite)."""
    def scalar(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    r = step.parameters.get("reduce_non_diagonal_ratio")
    if scalar(r) and not 0 <= r <= 1:
        raise PlanError(f"{step.merge_method}: parameters.reduce_non_diagonal_ratio={r} must be in [0, 1]")
    for i, mi in enumerate(step.models):
        w = mi.parameters.get("weight", step.parameters.get("weight"))
        if scalar(w) and w <= 0:
            raise PlanError(f"{step.merge_method}: models[{i}] weight={w} must be > 0 (it scales the model's "
                            "Gram matrices)")


def load_plan(source: Any) -> list[MergeStep]:
    """Steps from a mergekit YAML file path, a YAML/dict mapping, a list of mappings, or steps."""
    import yaml
    if isinstance(source, MergeStep):
        return [source]
    if isinstance(source, (str, Path)) and Path(source).is_file():
        path = source
        try:
            docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        # several documents: mergekit-multi's form, a chain whose intermediate merges are named
        # (`name`) and referred to by that name in later documents; the last is the final model
        source = docs if len(docs) > 1 else (docs[0] if docs else None)
        if len(docs) > 1 and any(not (isinstance(d, dict) and d.get("name")) for d in docs[:-1]):
            raise PlanError(f"{path}: every document but the last needs a name (mergekit-multi's "
                            "intermediate merges), by which later documents refer to it")
    if isinstance(source, dict) and "steps" in source:
        source = source["steps"]
    items = source if isinstance(source, list) else [source]
    return [s if isinstance(s, MergeStep) else step_from_dict(s, name=f"step{i}") for i, s in enumerate(items)]


# ---------------------------------------------------------------- per-tensor parameter values

def _evaluate(setting: Any, tensor: str, t: float) -> Any:
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            f = cond.get("filter") if isinstance(cond, dict) else None
            if f is None or f == "*" or (tensor and f in tensor):
                return _evaluate(cond["value"], tensor, t)
        return None
    raise PlanError(f"parameter value {setting!r} is not a number, a list or a filter condition")


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, bool) or isinstance(value, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return float(value)


def layer_t(tensor: str, num_layers: int) -> float:
    """mergekit's gradient position: layer / (layers - 1) inside the layers, 0 outside."""
    m = _LAYER.search("." + tensor)
    if not m or num_layers <= 1:
        return 0.0 if not m else 1.0
    return int(m.group(1)) / (num_layers - 1)


def _slice_of(step: MergeStep, tensor: str, num_layers: int) -> tuple[Slice, float]:
    """The slice a tensor belongs to and its gradient position there (mergekit's: the slice's
    layers from 0 to 1; 0 for the embeddings, planned with the first slice, and for the final
    norm and LM head, planned with the last)."""
    m = _LAYER.search("." + tensor)
    if not m:
        return (step.slices[0] if "embed" in tensor or "wte" in tensor else step.slices[-1]), 0.0
    i = int(m.group(1))
    sl = next((x for x in step.slices if x.start <= i < x.end), step.slices[-1])
    n = sl.end - sl.start
    return sl, (i - sl.start) / (n - 1) if n > 1 else 1.0


def tensor_parameters(step: MergeStep, tensor: str, num_layers: int) -> tuple[dict, list[dict]]:
    """(shared, per non-base model) parameter values for one tensor, defaults filled in."""
    spec = METHODS[step.merge_method]
    if step.slices:
        sl, t = _slice_of(step, tensor, num_layers)
        outer, own = [sl.parameters, step.parameters], sl.per_model
    else:
        t, outer, own = layer_t(tensor, num_layers), [step.parameters], {m.model: m.parameters for m in step.models}

    def resolve(key, default, scopes):
        for scope in scopes:
            if key in scope:
                v = _evaluate(scope[key], tensor, t)
                if v is not None:
                    return _coerce(v, default)
        if default is None:
            raise PlanError(f"{step.merge_method}: no value of {key} applies to tensor {tensor}")
        return default

    shared = {k: resolve(k, d, outer) for k, d in spec.shared.items()}
    per = [{k: resolve(k, d, [own.get(m.model, {}), *outer]) for k, d in spec.per_model.items()}
           for m in step.others]
    return shared, per
