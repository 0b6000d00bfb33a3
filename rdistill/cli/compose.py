"""Hydra composition of conf/ into a validated ExperimentConfig, with one-line errors.

Hydra lives here (the command line's layer) and in conf/ only; stages and the rest of the
package take plain dataclasses. conf/ is the checkout's (the project is installed editable);
RDISTILL_CONF_DIR points elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from rdistill.config import ConfigError, ExperimentConfig, validated

CONF_DIR = Path(os.environ.get("RDISTILL_CONF_DIR") or Path(__file__).resolve().parents[2] / "conf")

ConfigStore.instance().store(name="schema", node=ExperimentConfig)


def _one_line(e: Exception) -> str:
    """Hydra and OmegaConf errors span several lines; keep what names the key and the problem."""
    text = str(e).strip()
    key = re.search(r"full_key:\s*(\S+)", text)
    first = text.splitlines()[0] if text else type(e).__name__
    cause = e.__cause__ or e.__context__
    if ("Could not override" in first or "Error merging override" in first) and cause is not None:
        return _one_line(cause)
    if "not in struct" in first or "Key '" in first and "not in" in first:
        k = key.group(1) if key else re.search(r"Key '([^']+)'", first).group(1)
        return f"unknown config key '{k}': check the spelling (python jobs/run.py --help lists the keys)"
    if key:
        return f"{key.group(1)}: {first}"
    opts = re.search(r"Available options in '([^']+)':\s*\n((?:\t.*\n?)+)", text)
    if "Could not find" in first and opts:
        return f"{first.split(': ', 1)[-1]}; available {opts.group(1)} options: " + \
            ", ".join(o.strip() for o in opts.group(2).splitlines() if o.strip())
    return first


def load(overrides: list[str] | None = None) -> ExperimentConfig:
    """Compose conf/config.yaml with Hydra overrides and validate it; raises ConfigError."""
    if not (CONF_DIR / "config.yaml").exists():
        raise ConfigError(f"no Hydra configs at {CONF_DIR}: run from a checkout of rdistill (installed with "
                          "pip install -e .) or set RDISTILL_CONF_DIR to its conf/ folder")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
        return validated(cfg)
    except ConfigError:
        raise
    except Exception as e:  # Hydra/OmegaConf: unknown key, wrong type, unknown group option
        raise ConfigError(_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
