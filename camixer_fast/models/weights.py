"""The official CAMixerSR checkpoints by name: where each is found ($CAMIXER_FAST_WEIGHTS, the
user cache, a sha256-verified download) and the digests that identify it."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_ENV = "CAMIXER_FAST_WEIGHTS"


class CheckpointError(ValueError):
    """The weights given are not a usable CAMixerSR checkpoint."""


@dataclass(frozen=True)
class RegisteredWeights:
    """An official checkpoint: without ``sha256`` never downloaded, and a cached copy must
    match ``git_blob``; ``local_name``: its name in the
    cache and in a ``$CAMIXER_FAST_WEIGHTS`` folder when the official name is ambiguous."""

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    git_blob: str | None = None
    local_name: str | None = None

    @property
    def stored_name(self) -> str:
        return self.local_name or self.filename


OFFICIAL_URL = "https://github.com/icandle/CAMixerSR/raw/main/pretrained_models/"


def _official(folder: str, filename: str, git_blob: str, *, sha256: str | None = None,
              size: int | None = None, local_name: str | None = None) -> RegisteredWeights:
    return RegisteredWeights(filename, f"{OFFICIAL_URL}{folder}/{filename}", sha256, size,
                             git_blob, local_name)


REGISTRY: dict[str, RegisteredWeights] = {
    # large-image SR (DIV2K, x4): C = 36 / 48 / 60
    "CAMixerSR-S": _official(
        "LargeSR", "CAMixerSR_S.pth", "eb470abd9295cb46d54436900d0a34be2bec0192",
        sha256="49ffcfbb59583b4512ed7f4290b6f480b4bac50afb3d1db1553687bbdeff3076",
        size=3_323_709),
    "CAMixerSR-M": _official("LargeSR", "CAMixerSR_M.pth",
                             "587c1704ae00808319015ab8754c80c054994eee"),
    # the same bytes as LightSR x4 (one git object in the official repository)
    "CAMixerSR-B": _official("LargeSR", "CAMixerSR_B.pth",
                             "832f81a75f68125e0038fcd4514493bd3cde8fbc"),
    "CAMixerSR-ClassSR": _official("LargeSR", "CAMixerSR_ClassSR.pth",
                                   "d34586dcecc7587aecb3fd2dfb1c2da7017144dc"),
    # lightweight SR, C = 60, DIV2K or (-DF2K) DF2K; no x3 DF2K model is published
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
    "CAMixerSR-ODISR-x2": _official("ODISR", "CAMixerSRx2.pth",
                                    "b88949a0cb694b6534d051497a33f22c92244a3f",
                                    local_name="CAMixerSR_ODISR_x2.pth"),
    "CAMixerSR-ODISR-x4": _official("ODISR", "CAMixerSRx4.pth",
                                    "26f0cca359323b523d4b37ed5f86dd072bdcf844",
                                    local_name="CAMixerSR_ODISR_x4.pth"),
}


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$XDG_CACHE_HOME/camixer_fast`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "camixer_fast"


def _digest(path: Path, digest) -> str:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return _digest(path, hashlib.sha256())


def git_blob_id(path: Path) -> str:
    """The git object id of a file's contents: SHA-1 of ``b"blob <size>\\0" + bytes``."""
    return _digest(path, hashlib.sha1(f"blob {path.stat().st_size}\0".encode()))


def download(entry: RegisteredWeights, dest: Path) -> None:
    """Fetch ``entry.url`` into ``dest`` atomically. Raises CheckpointError (one line saying
    where to put the file by hand) for no network, an HTTP error or a wrong sha256, leaving no
    file or folder it created."""
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
            got = file_sha256(tmp)
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
    """The file $CAMIXER_FAST_WEIGHTS names for ``entry`` (that file, or a folder holding it),
    None when unset; naming anything else raises CheckpointError rather than being ignored."""
    env = os.environ.get(WEIGHTS_ENV)
    if not env:
        return None
    path = Path(env).expanduser()
    where = f"${WEIGHTS_ENV}={env}" + ("" if path.is_absolute() else
                                      f" (relative to {Path.cwd()})")
    if path.is_file():
        # one file serves only the name it is the file of: its official name, or its digest
        if path.name in (entry.filename, entry.stored_name) or (entry.sha256 is not None
                                           and file_sha256(path) == entry.sha256):
            return path
        raise CheckpointError(f"{where} is a file, but not {entry.filename} (the weights of "
                              f"this name); point the variable at a folder holding "
                              f"{entry.filename}, or pass the file's path as the weights")
    if path.is_dir():
        if (path / entry.stored_name).is_file():
            return path / entry.stored_name
        raise CheckpointError(f"{where} is a folder without {entry.stored_name}; put the file "
                              f"there or point the variable at the file ({entry.url})")
    raise CheckpointError(f"{where}: no such file or folder; point it at {entry.filename} "
                          f"or its folder, or unset it to use the cache ({cache_dir()})")


def resolve_weights(name: str) -> Path:
    """The file behind a registered name: $CAMIXER_FAST_WEIGHTS, else the user cache, else a
    verified download into the cache. Raises CheckpointError when none gives the file."""
    if name not in REGISTRY:
        raise CheckpointError(f"unknown weights name {name!r}; known names: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    from_env = _env_weights(entry)
    if from_env is not None:
        return from_env
    cached = cache_dir() / entry.stored_name
    if entry.sha256 is None:
        return _unverifiable(name, entry, cached)
    if cached.is_file():
        if file_sha256(cached) == entry.sha256:
            return cached
        print(f"camixer_fast: cached {cached} is corrupt (sha256 mismatch); downloading again",
              file=sys.stderr)
    download(entry, cached)
    return cached


def _unverifiable(name: str, entry: RegisteredWeights, cached: Path) -> Path:
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
