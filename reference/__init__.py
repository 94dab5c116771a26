"""Pure-PyTorch fp32 reference of CAMixerSR, ``spec/camixersr.md`` op by op; the kernels' twin."""

from camixer_fast.reference.attention_inference import window_attention
from camixer_fast.reference.attention_training import masked_window_attention
from camixer_fast.reference.model import BlockWeights, CAMixerSR, pad_to_multiple
from camixer_fast.reference.routing import (
    BlockRouting,
    Routing,
    WindowRouting,
    flat_hard_windows,
    route_windows,
    select_windows,
    training_mask,
    window_scores,
)
from camixer_fast.reference.warp import deform_warp, deformable_key

__all__ = [
    "BlockRouting",
    "BlockWeights",
    "CAMixerSR",
    "Routing",
    "WindowRouting",
    "deform_warp",
    "deformable_key",
    "flat_hard_windows",
    "masked_window_attention",
    "pad_to_multiple",
    "route_windows",
    "select_windows",
    "training_mask",
    "window_attention",
    "window_scores",
]
