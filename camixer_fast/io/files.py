"""Outputs written whole or not at all: a temporary file beside the destination, renamed over it
when complete, with the mode a plain ``open`` would give (0o666 less the umask)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".part") -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s folder (ending in ``suffix``, for writers that pick
    the format by it); on success it replaces ``dest``, on any error (KeyboardInterrupt
    included) it is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
