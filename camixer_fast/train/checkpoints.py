"""The EMA of the weights and training checkpoints: the official format (``params``,
``params_ema``) plus the training state, written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from camixer_fast.models.loading import CheckpointError

CHECKPOINT_FORMAT = "camixer_fast.train/1"


class EMA:
    """ema ← decay·ema + (1 − decay)·weights after each step (floating tensors; others copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            ema = self.state[key]
            if ema.is_floating_point():
                ema.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                ema.copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = set(self.state) ^ set(state)
        if missing:
            raise CheckpointError(f"EMA state keys differ from the model's: {sorted(missing)[:5]}")
        for key, value in state.items():
            self.state[key].copy_(value)


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """``torch.save(payload, path)`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_name, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint written by :class:`Trainer` (``weights_only`` loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would take a name's suffix
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for non-checkpoint files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    needed = ("params", "params_ema", "optimizer", "scheduler", "step", "model_config")
    missing = [k for k in needed if not isinstance(obj, Mapping) or k not in obj]
    if missing:
        raise CheckpointError(f"{path} has no training state to resume from (missing "
                              f"{missing}); use it as --init to fine-tune instead")
    return dict(obj)


__all__ = [
    "CHECKPOINT_FORMAT",
    "EMA",
    "read_checkpoint",
    "save_checkpoint",
]
