"""Checkpoint conversion of CAMixerSR and CAMixerOSR (ODI-SR): official ``.pth`` <->
safetensors (one state dict, with the architecture, config, parameter count and source as
metadata); ``.pth`` in the official ``{"params", "params_ema"}`` layout.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from camixer_fast.models.loading import (
    METADATA_CONFIG,
    CheckpointError,
    build_model,
    build_osr_model,
    extract_state_dict,
    infer_config,
    infer_osr_config,
    is_osr_state_dict,
    read_weights,
    weights_file,
)
from camixer_fast.models.weights import file_sha256

SAFETENSORS_SUFFIXES = (".safetensors",)
PTH_SUFFIXES = (".pth", ".pt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KEYS = ("params_ema", "params")


def _select(obj: Mapping, key: str | None) -> tuple[dict[str, Tensor], str]:
    """The state dict to convert and the key it came from ("bare" for a bare state dict)."""
    if key is not None:
        if key not in KEYS:
            raise ValueError(f"key must be one of {KEYS}, got {key!r}")
        if key not in obj:
            raise CheckpointError(f"the checkpoint has no {key!r} entry (it has "
                                  f"{sorted(k for k in obj if k in KEYS) or 'neither'})")
        return extract_state_dict(obj[key]), key
    found = next((k for k in KEYS if k in obj), "bare")
    return extract_state_dict(obj), found


def safetensors_metadata(state_dict: Mapping[str, Tensor], config: dict, *, source: str,
                         source_sha256: str | None, source_key: str,
                         architecture: str = "CAMixerSR") -> dict[str, str]:
    """The metadata strings written with a converted state dict."""
    from camixer_fast import __version__

    parameters = sum(t.numel() for t in state_dict.values())
    metadata = {
        "format": "pt",
        "camixer_fast.architecture": architecture,
        METADATA_CONFIG: json.dumps(config),
        "camixer_fast.parameters": str(parameters),
        "camixer_fast.dtype": str(next(iter(state_dict.values())).dtype).removeprefix("torch."),
        "camixer_fast.source": source,
        "camixer_fast.source_key": source_key,
        "camixer_fast.version": __version__,
    }
    if source_sha256 is not None:
        metadata["camixer_fast.source_sha256"] = source_sha256
    return metadata


def _write_atomic(dest: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temporary file beside ``dest``, then it is moved into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def convert_checkpoint(source: str | os.PathLike, dest: str | os.PathLike, *,
                       key: str | None = None, dtype: torch.dtype | None = None,
                       overwrite: bool = False) -> dict[str, str]:
    """Convert a checkpoint (registered name or file) to ``dest``: ``*.safetensors`` or an
    official-layout ``*.pth``/``*.pt``. key: "params_ema" or "params" (default: the first
    present); dtype: cast the tensors. Returns the metadata; ``dest`` appears whole or not at all.
    """
    dest = Path(dest).expanduser()
    suffix = dest.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PTH_SUFFIXES:
        raise ValueError(f"{dest}: unknown output format {suffix or '(no suffix)'!r}; use "
                         ".safetensors, .pth or .pt")
    path = weights_file(source)
    if dest.exists() and dest.resolve() == path.resolve():
        raise ValueError(f"{dest} is the input file; choose another output")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists (pass overwrite=True / --overwrite to replace it)")
    if not dest.parent.is_dir():
        raise ValueError(f"{dest.parent}: no such folder for {dest.name}")
    state_dict, source_key = _select(read_weights(path), key)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                      for k, v in state_dict.items()}
    if is_osr_state_dict(state_dict):
        build_osr_model(state_dict)  # refuses an incomplete or misshapen one
        architecture, config = "CAMixerOSR", infer_osr_config(state_dict)
    else:
        build_model(state_dict)  # refuses anything that is not CAMixerSR
        architecture, config = "CAMixerSR", infer_config(state_dict)
    metadata = safetensors_metadata(state_dict, config, source=path.name,
                                    source_sha256=file_sha256(path), source_key=source_key,
                                    architecture=architecture)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        _write_atomic(dest, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        _write_atomic(dest, lambda tmp: torch.save({"params": tensors, "params_ema": tensors},
                                                   tmp))
    return metadata
