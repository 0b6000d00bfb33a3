"""Runs inside vLLM's worker processes (engine argument `worker_extension_cls`): in-place weight
loading for warm evaluation engines (rdistill.llm.warm).

vLLM 0.32's own `reload_weights` gives wrong outputs on the CPU backend: CPU linear layers pack
their weights for oneDNN / sgl kernels once at load time and drop the plain copy, so a reload
writes new weights that the packed kernels never see (seen here: a base reloaded with the
teacher's weights answered like neither). So linear layers keep their plain weights (twice the
weight memory on CPU, a few MB for the toy), `load_weights` copies the new checkpoint in
through the model's own loader (which knows fused qkv / gate_up layouts), and the CPU kernels
are packed again from them. On GPUs nothing is packed and the same load is what RL frameworks
use to sync weights into vLLM.
"""

from __future__ import annotations

import glob
import os

import vllm.model_executor.layers.utils as _layer_utils

_dispatch = _layer_utils.dispatch_cpu_unquantized_gemm


def _dispatch_keeping_weight(layer, remove_weight: bool) -> None:
    _dispatch(layer, remove_weight=False)


# linear.py imports this name at call time, so the patch is seen by every layer loaded after it
_layer_utils.dispatch_cpu_unquantized_gemm = _dispatch_keeping_weight


class WeightLoader:
    """Mixed into vLLM's Worker; called through `LLM.collective_rpc`."""

    def rdistill_load_weights(self, path: str) -> int:
        import torch
        from safetensors import safe_open
        from vllm.platforms import current_platform
        model = self.model_runner.get_model()

        def tensors():
            for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        yield k, st.get_tensor(k)
        with torch.no_grad():
            loaded = model.load_weights(tensors())
            if current_platform.is_cpu():
                for m in model.modules():  # pack the CPU kernels again from the new weights
                    w = getattr(m, "weight", None)
                    if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.numel():
                        _dispatch(m, remove_weight=False)
        return len(loaded or ())

    def rdistill_logit_scale(self, scale: float) -> float:
        """Multiply the model's logits by `scale` from now on (1/temperature for scoring at a
        temperature, rdistill.llm.tokens); returns the previous scale."""
        proc = self.model_runner.get_model().logits_processor
        old, proc.scale = proc.scale, float(scale)
        return old
