"""Fused Triton kernels for CAMixerSR's hot operations, twins of ``camixer_fast.reference``:
:mod:`.routing`, :mod:`.warp`, :mod:`.attention_inference`, :mod:`.attention_training`, and the
fused inference block :mod:`.block` (from :mod:`.predictor`, :mod:`.depthwise`,
:mod:`.mixer_tail`, :mod:`.ffn`); shared pieces in :mod:`.helpers`. Importing it imports triton.
"""

from camixer_fast.kernels.attention_inference import window_attention
from camixer_fast.kernels.attention_training import masked_window_attention
from camixer_fast.kernels.routing import route_windows
from camixer_fast.kernels.warp import deformable_key

__all__ = ["deformable_key", "masked_window_attention", "route_windows", "window_attention"]
