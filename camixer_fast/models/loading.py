"""Checkpoint loading: files, state dicts and registered names -> a ready CAMixerSR, the
hyperparameters inferred from tensor shapes (spec §6); anything else is refused by name."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from camixer_fast.models.weights import (
    REGISTRY,
    WEIGHTS_ENV,
    CheckpointError,
    resolve_weights,
)
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR

__all__ = ["METADATA_CONFIG", "WEIGHTS_ENV", "CheckpointError", "build_model",
           "extract_state_dict", "infer_config", "is_safetensors", "load_model", "read_weights",
           "read_safetensors", "weights_file"]

METADATA_CONFIG = "camixer_fast.config"


def weights_file(weights: str | os.PathLike) -> Path:
    """The file a registered name or a path names; CheckpointError for neither."""
    text = os.fspath(weights)
    if text in REGISTRY and not Path(text).exists():
        return resolve_weights(text)
    if (Path(text).expanduser().exists() or os.sep in text
            or text.endswith((".pth", ".pt", ".safetensors"))):
        return Path(text).expanduser()
    raise CheckpointError(f"{text!r} is neither a weights file nor a registered name "
                          f"(known names: {sorted(REGISTRY)})")


def read_weights(path: Path) -> Mapping:
    """A safetensors or PyTorch (``weights_only``) file's contents, told apart by content; else
    CheckpointError (never suggesting to unpickle)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if is_safetensors(path):
        return read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a "
                              f"pickle: it starts with {head!r})")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would take a name's suffix
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for non-checkpoint files
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(f"{path} is not a checkpoint of tensors: it holds a "
                                  f"{found[1]} object, which camixer_fast does not unpickle "
                                  "(unpickling can run code)") from None
        lines = [line for line in str(err).splitlines() if line.strip()]
        detail = (lines[0] if lines and "weights_only" not in str(err).lower().replace(" ", "_")
                  else type(err).__name__)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail})") \
            from None


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (header length, then JSON)."""
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) < 9 or start[8:9] != b"{":
        return False
    return int.from_bytes(start[:8], "little") <= path.stat().st_size - 8


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; its metadata's config, if any, must match the shapes'."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    recorded = metadata.get(METADATA_CONFIG)
    if recorded is not None:
        inferred = json.dumps(infer_osr_config(state_dict) if is_osr_state_dict(state_dict)
                              else infer_config(state_dict))
        if json.loads(recorded) != json.loads(inferred):
            raise CheckpointError(f"{path}: the config in its metadata, {recorded}, is not the "
                                  f"one its tensor shapes give, {inferred}")
    return state_dict


def extract_state_dict(obj: Mapping) -> dict[str, Tensor]:
    """The state dict in ``params_ema``, ``params`` or a bare one, ``module.`` prefixes removed."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict checkpoint, got {type(obj).__name__}")
    for key in ("params_ema", "params"):
        if key in obj:
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"not a state dict: entries {bad[:5]} are not named tensors "
                              "(expected 'params_ema', 'params' or parameter names)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _refuse_other_networks(state_dict: Mapping[str, Tensor]) -> None:
    if any(k.startswith("classifier.") for k in state_dict) and any(
            k.startswith("net1.") for k in state_dict):
        raise CheckpointError(
            "a ClassSR state dict: a classifier choosing among three CAMixerSR networks "
            "('net1.', 'net2.', 'net3.'), not one CAMixerSR; load one branch, e.g. "
            "{k.removeprefix('net3.'): v for k, v in sd.items() if k.startswith('net3.')}")
    if "head.weight" in state_dict and any(
            k.startswith(("dcn.", "offset_conv.")) for k in state_dict):
        raise CheckpointError("an ODISR state dict of CAMixerOSR (DCN tails, a latitude "
                              "condition), not CAMixerSR: load it with camixer_fast.load_model")


def infer_config(state_dict: Mapping[str, Tensor]) -> dict:
    """``{"n_feats", "scale", "blocks_per_group", "window_size"}`` from a CAMixerSR state dict's
    shapes (spec §6); CheckpointError otherwise (ClassSR and CAMixerOSR by name)."""
    _refuse_other_networks(state_dict)
    for key in ("head.weight", "tail.0.weight"):
        if key not in state_dict:
            raise CheckpointError(f"not a CAMixerSR state dict: missing {key!r}")
    n_feats = state_dict["head.weight"].shape[0]
    tail_out = state_dict["tail.0.weight"].shape[0]
    scale = round((tail_out / 3) ** 0.5)
    if 3 * scale * scale != tail_out or scale < 1:
        raise CheckpointError(f"'tail.0.weight' has {tail_out} output channels, not 3·s² for an "
                              "integer scale s")
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        match = re.match(r"body\.(\d+)\.body\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    if not blocks:
        raise CheckpointError("not a CAMixerSR state dict: no 'body.<group>.body.<block>.' keys")
    if sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"body groups are not numbered 0..n-1: {sorted(blocks)}")
    per_group = []
    for j in range(len(blocks)):
        if sorted(blocks[j]) != list(range(len(blocks[j]))):
            raise CheckpointError(f"blocks of body.{j} are not numbered 0..n-1: {sorted(blocks[j])}")
        per_group.append(len(blocks[j]))
    mask_key = "body.0.body.0.mixer.route.out_mask.0.weight"
    if mask_key not in state_dict:
        raise CheckpointError(f"not a CAMixerSR state dict: missing {mask_key!r}")
    tokens = state_dict[mask_key].shape[1]
    window_size = round(tokens**0.5)
    if window_size * window_size != tokens:
        raise CheckpointError(f"{mask_key!r} takes {tokens} inputs, not a square window")
    return {"n_feats": n_feats, "scale": scale, "blocks_per_group": tuple(per_group),
            "window_size": window_size}


def _check_keys(model: CAMixerSR, state_dict: Mapping[str, Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError("state dict does not fit CAMixerSR(" + model.extra_repr() + "): "
                              + "; ".join(problems))


def build_model(state_dict: Mapping[str, Tensor], **kwargs) -> CAMixerSR:
    """A CAMixerSR shaped after ``state_dict`` with its weights loaded strictly."""
    model = CAMixerSR(**infer_config(state_dict), **kwargs)
    _check_keys(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model


def load_model(weights: str | os.PathLike | Mapping, *, gamma: float = 0.5,
               backend: str = "auto", routing: str = "expected",
               device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> CAMixerSR | CAMixerOSR:
    """Load CAMixerSR (or CAMixerOSR, ODI-SR) weights into a ready model, in eval mode.

    weights: a registered name ("CAMixerSR-S"), a ``.pth``/``.safetensors`` file (official or
    bare) or a loaded dict. gamma: attention ratio γ in [0, 1]. backend: see
    :mod:`camixer_fast.backends` (CAMixerOSR: "auto", "reference", "cpu" or "triton",
    ValueError otherwise).
    routing: "expected" (deterministic) or "gumbel" (official).
    """
    obj = weights if isinstance(weights, Mapping) else read_weights(weights_file(weights))
    state_dict = extract_state_dict(obj)
    if is_osr_state_dict(state_dict):
        osr = build_osr_model(state_dict, gamma=gamma, routing=routing, backend=backend)
        return osr.to(device=device, dtype=dtype).eval()
    model = build_model(state_dict, gamma=gamma, routing=routing)
    model = model.to(device=device, dtype=dtype).eval()
    model.backend = backend
    return model


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
