"""Pure-PyTorch reference of CAMixerSR: the network and its three hot operations.

Everything here computes in fp32 and follows ``spec/camixersr.md`` op by op; the Triton kernels in
``camixer_fast.kernels`` have the same signatures and are tested against these functions.

- :mod:`.routing`: window scores, per-image K, hard/simple window order (spec §3.4–3.5, §4), and
  the routing record a forward returns
- :mod:`.warp`: the deformable bilinear warp of the keys (spec §3.6)
- :mod:`.attention_inference`: attention on hard windows, ``v·sa`` on simple ones (spec §3.7)
- :mod:`.attention_training`: the dense masked attention of training (spec §4)
- :mod:`.model`: the network (spec §1–§4)
"""

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
