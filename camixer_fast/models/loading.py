"""Checkpoint loading: official files, state dicts and registered names -> a ready CAMixerSR.

Hyperparameters are inferred from tensor shapes (spec §6), as spandrel does; anything that is not
a CAMixerSR state dict is refused with an error naming what is missing or unexpected.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from camixer_fast.reference.model import CAMixerSR

WEIGHTS_ENV = "CAMIXER_FAST_WEIGHTS"
METADATA_CONFIG = "camixer_fast.config"
"""The safetensors metadata key holding the model's config as JSON (see :func:`infer_config`)."""


class CheckpointError(ValueError):
    """The weights given are not a usable CAMixerSR checkpoint."""


@dataclass(frozen=True)
class RegisteredWeights:
    """An official checkpoint known by name.

    filename: the official file name (looked for in ``$CAMIXER_FAST_WEIGHTS`` and the cache).
    url:      where the official repository serves it.
    sha256:   the digest a download must have; ``None`` when none is published, and then the
              file is never downloaded (it must be put in place by hand).
    size:     its size in bytes, where known.
    git_blob: the object id of the file in the official repository's git tree (SHA-1 of
              ``b"blob <size>\\0" + bytes``); a cached copy of a file without a sha256 must
              match it.
    refused:  why the file cannot be loaded (a different architecture), or ``None``.
    """

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    git_blob: str | None = None
    refused: str | None = None


_OFFICIAL = "https://github.com/icandle/CAMixerSR/raw/main/pretrained_models/"
_OSR_WHY = ("CAMixerOSR, a different architecture (deformable convolutions, a latitude "
            "condition, shifted windows) that camixer_fast does not implement")


def _official(folder: str, filename: str, git_blob: str, *, sha256: str | None = None,
              size: int | None = None, refused: str | None = None) -> RegisteredWeights:
    return RegisteredWeights(filename, f"{_OFFICIAL}{folder}/{filename}", sha256, size, git_blob,
                             refused)


REGISTRY: dict[str, RegisteredWeights] = {
    # large-image SR (DIV2K, ×4): C = 36 / 48 / 60
    "CAMixerSR-S": _official(
        "LargeSR", "CAMixerSR_S.pth", "eb470abd9295cb46d54436900d0a34be2bec0192",
        sha256="49ffcfbb59583b4512ed7f4290b6f480b4bac50afb3d1db1553687bbdeff3076",
        size=3_323_709),
    "CAMixerSR-M": _official("LargeSR", "CAMixerSR_M.pth",
                             "587c1704ae00808319015ab8754c80c054994eee"),
    # the same bytes as LightSR ×4 (one git object in the official repository)
    "CAMixerSR-B": _official("LargeSR", "CAMixerSR_B.pth",
                             "832f81a75f68125e0038fcd4514493bd3cde8fbc"),
    "CAMixerSR-ClassSR": _official("LargeSR", "CAMixerSR_ClassSR.pth",
                                   "d34586dcecc7587aecb3fd2dfb1c2da7017144dc"),
    # lightweight SR, C = 60, trained on DIV2K, or DF2K for the -DF2K names (the official
    # repository publishes no ×3 DF2K model)
    "CAMixerSR-LightSR-x2": _official("LightSR", "CAMixerSRx2.pth",
                                      "8a6d6d19a8ee1aeeb5ac03b7a9618288265390be"),
    "CAMixerSR-LightSR-x3": _official("LightSR", "CAMixerSRx3.pth",
                                      "1bb089df3657fd48b31f4bcbdab41331f23a7879"),
    "CAMixerSR-LightSR-x4": _official("LightSR", "CAMixerSRx4.pth",
                                      "832f81a75f68125e0038fcd4514493bd3cde8fbc"),
    "CAMixerSR-LightSR-x2-DF2K": _official("LightSR", "CAMixerSRx2_DF.pth",
                                           "3302e2bcd6b73d100b1298ea2076bee5f1fdc22a"),
    "CAMixerSR-LightSR-x4-DF2K": _official("LightSR", "CAMixerSRx4_DF.pth",
                                           "18bb973e5faf8081d8fc846de0a24ad4340dc0dc"),
    # omnidirectional SR: another network
    "CAMixerSR-ODISR-x2": _official("ODISR", "CAMixerSRx2.pth",
                                    "b88949a0cb694b6534d051497a33f22c92244a3f",
                                    refused=f"is an ODISR checkpoint of {_OSR_WHY}"),
    "CAMixerSR-ODISR-x4": _official("ODISR", "CAMixerSRx4.pth",
                                    "26f0cca359323b523d4b37ed5f86dd072bdcf844",
                                    refused=f"is an ODISR checkpoint of {_OSR_WHY}"),
}
"""Every checkpoint the official repository publishes, by name. Only those with a sha256 are
downloaded (and verified); the others are read from ``$CAMIXER_FAST_WEIGHTS`` or the cache."""


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$XDG_CACHE_HOME/camixer_fast`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "camixer_fast"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_id(path: Path) -> str:
    """The git object id of a file's contents: SHA-1 of ``b"blob <size>\\0" + bytes``."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(entry: RegisteredWeights, dest: Path) -> None:
    """Fetch ``entry.url`` into ``dest`` atomically, refusing a file whose sha256 differs.

    A failed download (no network, HTTP error, wrong digest) raises CheckpointError, one line
    that says where the file can be put by hand, and leaves no file or folder it created."""
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"camixer_fast: downloading {entry.filename} from {entry.url}", file=sys.stderr)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{entry.filename}.",
                                        suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, \
                    urllib.request.urlopen(entry.url, timeout=60) as resp:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
            got = _sha256(tmp)
            if got != entry.sha256:
                raise CheckpointError(f"download of {entry.url} has sha256 {got}, expected "
                                      f"{entry.sha256}; nothing was saved")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    except (OSError, ValueError) as err:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(err, CheckpointError):
            raise
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise CheckpointError(
            f"cannot download {entry.filename} ({reason}); put the file at {dest} or set "
            f"${WEIGHTS_ENV} to it (or to its folder); it is at {entry.url}") from None


def _env_weights(entry: RegisteredWeights) -> Path | None:
    """The file ``$CAMIXER_FAST_WEIGHTS`` names for ``entry`` (a file -- ``entry.filename`` or
    a file with its sha256 --, or a folder holding ``entry.filename``); None when the variable
    is unset or empty. A value that names no such
    file raises CheckpointError naming the variable and the path, rather than being ignored."""
    env = os.environ.get(WEIGHTS_ENV)
    if not env:
        return None
    path = Path(env).expanduser()
    where = f"${WEIGHTS_ENV}={env}" + ("" if path.is_absolute() else
                                      f" (relative to {Path.cwd()})")
    if path.is_file():
        # one file serves only the name it is the file of: its official name, or its digest
        if path.name == entry.filename or (entry.sha256 is not None
                                           and _sha256(path) == entry.sha256):
            return path
        raise CheckpointError(f"{where} is a file, but not {entry.filename} (the weights of "
                              f"this name); point the variable at a folder holding "
                              f"{entry.filename}, or pass the file's path as the weights")
    if path.is_dir():
        if (path / entry.filename).is_file():
            return path / entry.filename
        raise CheckpointError(f"{where} is a folder without {entry.filename}; put the file "
                              f"there or point the variable at the file ({entry.url})")
    raise CheckpointError(f"{where}: no such file or folder; point it at {entry.filename} "
                          f"or its folder, or unset it to use the cache ({cache_dir()})")


def resolve_weights(name: str) -> Path:
    """The file behind a registered name: ``$CAMIXER_FAST_WEIGHTS`` (a file, or a folder holding
    the official file name; set to anything else, it is an error), else the user cache, else a
    verified download into the cache. Raises CheckpointError when none of them gives the file."""
    if name not in REGISTRY:
        raise CheckpointError(f"unknown weights name {name!r}; known names: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    if entry.refused:
        raise CheckpointError(f"{name} ({entry.url}) {entry.refused}")
    from_env = _env_weights(entry)
    if from_env is not None:
        return from_env
    cached = cache_dir() / entry.filename
    if entry.sha256 is None:
        return _unverifiable(name, entry, cached)
    if cached.is_file():
        if _sha256(cached) == entry.sha256:
            return cached
        print(f"camixer_fast: cached {cached} is corrupt (sha256 mismatch); downloading again",
              file=sys.stderr)
    _download(entry, cached)
    return cached


def _unverifiable(name: str, entry: RegisteredWeights, cached: Path) -> Path:
    """A file without a published sha256: the cached copy if it is the official one; it is
    never downloaded."""
    if cached.is_file():
        if entry.git_blob is None or git_blob_id(cached) == entry.git_blob:
            return cached
        raise CheckpointError(
            f"{cached} is not the official {entry.filename} (its git object id is not "
            f"{entry.git_blob}, the one in the official repository); replace it with the file "
            f"from {entry.url}")
    raise CheckpointError(
        f"{name}: no sha256 is published for {entry.filename}, so it is not downloaded "
        f"automatically. Download it yourself from {entry.url} and put it at {cached}, or in "
        f"a folder named by ${WEIGHTS_ENV}")


def _read_file(path: Path) -> Mapping:
    """torch.load of a checkpoint file with ``weights_only=True``; anything that is not a
    checkpoint of tensors raises CheckpointError saying so (never suggesting to unpickle it)."""
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
        return torch.load(path, map_location="cpu", weights_only=True)
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
    """Whether ``path`` starts like a safetensors file (an 8-byte little-endian header length,
    then the JSON header), whatever its suffix."""
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) < 9 or start[8:9] != b"{":
        return False
    return int.from_bytes(start[:8], "little") <= path.stat().st_size - 8


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, after checking the CAMixerSR config its metadata
    records, if any, against the one its tensor shapes give."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    recorded = metadata.get(METADATA_CONFIG)
    if recorded is not None:
        inferred = json.dumps(infer_config(state_dict))
        if json.loads(recorded) != json.loads(inferred):
            raise CheckpointError(f"{path}: the config in its metadata, {recorded}, is not the "
                                  f"one its tensor shapes give, {inferred}")
    return state_dict


def extract_state_dict(obj: Mapping) -> dict[str, Tensor]:
    """The state dict inside an official checkpoint (``params_ema``, then ``params``) or a bare
    one, with any ``module.`` prefix removed."""
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
        raise CheckpointError(f"an ODISR state dict of {_OSR_WHY}")


def infer_config(state_dict: Mapping[str, Tensor]) -> dict:
    """Hyperparameters of a CAMixerSR state dict from its tensor shapes (spec §6).

    Returns ``{"n_feats", "scale", "blocks_per_group", "window_size"}``. The official
    repository's other networks (ClassSR's three-branch model, CAMixerOSR) are refused by name.
    """
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
               dtype: torch.dtype = torch.float32) -> CAMixerSR:
    """Load CAMixerSR weights into a ready model, in eval mode.

    weights: a registered name (``"CAMixerSR-S"``, see :data:`REGISTRY`), a path to an
             official ``.pth`` file (``params_ema`` preferred, then ``params``), a bare state dict
             file or a ``.safetensors`` file, or an already-loaded dict of either kind.
    gamma:   attention ratio γ in [0, 1] (changeable later through ``model.gamma``).
    backend: "auto", "reference" or "triton" (see :mod:`camixer_fast.backends`).
    routing: "expected" (deterministic, the default) or "gumbel" (the official random draw).
    """
    if isinstance(weights, Mapping):
        obj = weights
    else:
        text = os.fspath(weights)
        if text in REGISTRY and not Path(text).exists():
            obj = _read_file(resolve_weights(text))
        elif (Path(text).expanduser().exists() or os.sep in text
              or text.endswith((".pth", ".pt", ".safetensors"))):
            obj = _read_file(Path(text).expanduser())
        else:
            raise CheckpointError(f"{text!r} is neither a weights file nor a registered name "
                                  f"(known names: {sorted(REGISTRY)})")
    model = build_model(extract_state_dict(obj), gamma=gamma, routing=routing)
    model = model.to(device=device, dtype=dtype).eval()
    model.backend = backend
    return model
