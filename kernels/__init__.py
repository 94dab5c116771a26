"""Fused Triton twins of ``camixer_fast.reference``'s hot operations; importing imports triton."""

from camixer_fast.kernels.attention_inference import window_attention
from camixer_fast.kernels.attention_training import masked_window_attention
from camixer_fast.kernels.dcn import deform_conv
from camixer_fast.kernels.routing import route_windows
from camixer_fast.kernels.warp import deformable_key

__all__ = ["deform_conv", "deformable_key", "masked_window_attention", "route_windows",
           "window_attention"]
