"""Fused Triton kernels for CAMixerSR's hot operations, with the signatures of their twins in
``camixer_fast.reference``:

- :mod:`.routing`: window scores, per-image K and window order (no host sync, no argsort)
- :mod:`.warp`: the deformable key ``x + warp(x, offsets)``, forward and backward
- :mod:`.window_attention`: hard-window attention with ``v·sa`` on simple windows (inference),
  and the dense masked attention of training, forward and backward

Importing this package imports triton; ``camixer_fast.backends`` does so only when the Triton
backend is chosen.
"""

from types import SimpleNamespace

from camixer_fast.kernels.routing import route_windows
from camixer_fast.kernels.warp import deformable_key
from camixer_fast.kernels.window_attention import masked_window_attention, window_attention
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
