"""rdistill: Branch-Merge distillation of large reasoning models on Ray.

Stages, one subpackage each, usable from Python without Hydra:
generate -> verify -> train -> merge -> evaluate -> report -> serve, plus the toy world.
"""

__version__ = "0.1.0"
