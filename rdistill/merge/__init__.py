"""The merge phase: Arcee Fusion and the standard merge methods as streaming Ray tasks.

    from rdistill.merge import merge
    merge("fusion.yml", "out/merged")            # a mergekit YAML, a dict, or a list of steps

`python jobs/merge.py CONFIG.yml OUT_DIR` is the drop-in for `mergekit-yaml CONFIG.yml OUT_DIR`.
"""

from rdistill.merge.api import merge
from rdistill.merge.execute import MergeError, Options, run_step
from rdistill.merge.methods import METHODS
from rdistill.merge.plan import MergeStep, ModelInput, PlanError, load_plan, step_from_dict
from rdistill.merge.st_io import InputError

__all__ = ["merge", "MergeError", "Options", "run_step", "METHODS", "MergeStep", "ModelInput",
           "PlanError", "load_plan", "step_from_dict", "InputError"]
