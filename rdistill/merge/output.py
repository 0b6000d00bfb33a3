"""What a merge step writes besides its tensors: the output's config (the donor's, with the
merged dtype and vocabulary), the donor's tokenizer and generation files, the shards' index; and
the check that the written tensors are what transformers' model class expects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from rdistill.errors import RdistillError
from rdistill.merge.inputs import InputModel
from rdistill.merge.st_io import OutTensor, write_index
from rdistill.merge.work import FLOAT_RANK

COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
          "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
          "generation_config.json"]
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class MergeError(RdistillError):
    """A merge produced a bad result (non-finite tensors, a model that does not load)."""


def write_config(tmp: Path, donor: InputModel, placed: list[OutTensor], vocab: Optional[int]) -> None:
    config = dict(donor.config)
    dtypes = {t.dtype for t in placed if t.dtype in FLOAT_RANK}
    if len(dtypes) == 1:
        name = {v: k for k, v in ST_DTYPE.items()}.get(dtypes.pop(), "float32")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if vocab is not None:
        config["vocab_size"] = vocab
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def finish_dir(tmp: Path, donor: InputModel, placed: list[OutTensor]) -> None:
    for f in COPIED:
        src = Path(donor.path) / f
        if src.exists():
            shutil.copy(src, tmp / f)
    write_index(tmp, placed)


_CHECKED: set = set()  # (config, tensor shapes) already found to load, in this process


def check_loads(model_dir: Path, placed: list[OutTensor], name: str = "") -> None:
    """The written tensors are exactly what transformers' model class for model_dir's config
    expects. Needs only the config, so it runs beside the merge (importing transformers is
    seconds); a search's candidates of one architecture are checked once."""
    key = ((model_dir / "config.json").read_text(), tuple(sorted((t.name, tuple(t.shape)) for t in placed)))
    if key in _CHECKED:
        return
    import torch
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    auto = transformers.AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in
                                                  (cfg.architectures or [])) else transformers.AutoModel
    with torch.device("meta"):
        model = auto.from_config(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {t.name: tuple(t.shape) for t in placed}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if cfg.get_text_config().tie_word_embeddings else set()
    missing = sorted(k for k in set(want) - set(have) if k not in tied and not k.endswith("lm_head.weight"))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or wrong:
        raise MergeError(f"{name or model_dir} does not load in transformers: missing {missing[:3]}, "
                         f"wrong shapes {wrong[:3]}")
    _CHECKED.add(key)
