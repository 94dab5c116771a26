"""Fused Triton kernels for CAMixerSR's hot operations, with the signatures of their twins in
``camixer_fast.reference``:

- :mod:`.routing`: window scores, per-image K and window order (no host sync, no argsort)
- :mod:`.warp`: the deformable key ``x + warp(x, offsets)``, forward and backward
- :mod:`.attention_inference`: hard-window attention with ``v·sa`` on simple windows
- :mod:`.attention_training`: the dense masked attention of training, forward and backward
- :mod:`.block`: a whole block at inference (the backend's ``block_inference``), from
  :mod:`.predictor`, :mod:`.depthwise`, :mod:`.mixer_tail` and :mod:`.ffn` (helpers in
  :mod:`.tile_math`) and the kernels above

The package exports the functions (``camixer_fast.kernels.window_attention`` is the function);
the modules are named apart from them. Importing this package imports triton;
``camixer_fast.backends`` does so only when the Triton backend is chosen.

On a GPU, the launch configurations that ran correctly on one (issue 9's H200 run) are marked
``proven`` (:func:`.attention_inference.tile_config`, :func:`.attention_training.tile_config`);
the half-precision training attention and the warp backward's channel step are unproven on a
GPU. fp32 tiles are multiplied as PyTorch's TF32 switch says (:func:`._tiles.dot_precision`:
TF32, or the parity mode by IEEE products or tf32x3), and under ``torch.autocast`` the entries
cast their inputs to one dtype (:mod:`._autocast`).
"""

from types import SimpleNamespace

from camixer_fast.kernels.attention_inference import window_attention
from camixer_fast.kernels.attention_training import masked_window_attention
from camixer_fast.kernels.routing import route_windows
from camixer_fast.kernels.warp import deformable_key
from camixer_fast.reference.routing import window_scores

TRITON_OPS = SimpleNamespace(
    name="triton",
    route_windows=route_windows,
    # training differentiates the window scores: the small MLP stays in PyTorch there
    window_scores=window_scores,
    deformable_key=deformable_key,
    window_attention=window_attention,
    masked_window_attention=masked_window_attention,
)

__all__ = ["TRITON_OPS", "deformable_key", "masked_window_attention", "route_windows",
           "window_attention"]
