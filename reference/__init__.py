"""Pure-PyTorch reference of CAMixerSR: the network and its three hot operations.

Everything here computes in fp32 and follows ``spec/camixersr.md`` op by op; the Triton kernels in
``camixer_fast.kernels`` have the same signatures and are tested against these functions.

- :mod:`.routing`: window scores, per-image K, hard/simple window order (spec §3.4–3.5, §4)
- :mod:`.warp`: the deformable bilinear warp of the keys (spec §3.6)
- :mod:`.window_attention`: attention on hard windows, ``v·sa`` on simple ones (spec §3.7, §4)
- :mod:`.model`: the network (spec §1–§4)
"""

from camixer_fast.reference.model import CAMixerSR, pad_to_multiple
from camixer_fast.reference.routing import (
    WindowRouting,
    flat_hard_windows,
    route_windows,
    select_windows,
    training_mask,
    window_scores,
)
from camixer_fast.reference.warp import deform_warp, deformable_key
from camixer_fast.reference.window_attention import masked_window_attention, window_attention

__all__ = [
    "CAMixerSR",
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
