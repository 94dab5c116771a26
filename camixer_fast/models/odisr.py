"""CAMixerOSR (ODI-SR) checkpoints in the official layout: recognise, configure, load."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from camixer_fast.models.loading import CheckpointError, extract_state_dict
from camixer_fast.reference.odisr import CAMixerOSR


def is_osr_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True for a CAMixerOSR state dict (its DCN tails), False for CAMixerSR and others."""
    return "head.weight" in state_dict and any(
        k.startswith(("dcn.", "offset_conv.")) for k in state_dict)


def infer_osr_config(state_dict: Mapping[str, Tensor]) -> dict:
    """``{"n_feats", "scale", "blocks_per_group", "window_size"}`` from the shapes; raises
    CheckpointError for a CAMixerSR state dict or anything else that does not fit."""
    if not is_osr_state_dict(state_dict):
        what = ("a CAMixerSR state dict (no DCN tails, a global predictor): load it with "
                "camixer_fast.load_model" if "global_predictor.0.weight" in state_dict
                else "not a CAMixerOSR state dict (no 'head.weight' and 'dcn.' keys)")
        raise CheckpointError(what)
    tail_out = state_dict["tail.0.weight"].shape[0] if "tail.0.weight" in state_dict else 0
    scale = round((tail_out / 3) ** 0.5)
    if scale < 1 or 3 * scale * scale != tail_out:
        raise CheckpointError(f"'tail.0.weight' has {tail_out} output channels, not 3·s²")
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        if match := re.match(r"body\.(\d+)\.body\.(\d+)\.", key):
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    if not blocks or sorted(blocks) != list(range(len(blocks))) or any(
            sorted(b) != list(range(len(b))) for b in blocks.values()):
        raise CheckpointError("the 'body.<group>.body.<block>.' keys are not numbered 0..n-1")
    tokens = state_dict["body.0.body.0.mixer.route.out_mask.0.weight"].shape[1]
    return {"n_feats": state_dict["head.weight"].shape[0], "scale": scale,
            "blocks_per_group": tuple(len(blocks[j]) for j in range(len(blocks))),
            "window_size": round(tokens**0.5)}


def build_osr_model(checkpoint: Mapping, **kwargs) -> CAMixerOSR:
    """CAMixerOSR of a checkpoint ({'params_ema': ...} or bare), strict, eval; kwargs: γ etc."""
    state_dict = extract_state_dict(checkpoint)
    model = CAMixerOSR(**infer_osr_config(state_dict), **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"state dict does not fit CAMixerOSR({model.extra_repr()}): "
                              f"{error}") from None
    return model.eval()
