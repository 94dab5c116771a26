"""16-bit PNG reading and writing, which Pillow does not do for colour images.

Pillow opens 16-bit RGB, RGBA and grey+alpha PNGs as 8-bit images (16-bit grey alone becomes
``I;16``), so the ``upscale`` command decodes every 16-bit PNG here into a uint16 array and
writes 16-bit results here too. Supported: all four 16-bit colour types (grey, grey+alpha, RGB,
RGBA), Adam7 interlacing, ``tRNS`` colour keys (turned into an alpha channel); the colour chunks
``iCCP``, ``sRGB``, ``gAMA`` and ``cHRM`` are handed back so a writer can keep them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_CHUNKS = (b"iCCP", b"sRGB", b"gAMA", b"cHRM")
"""Ancillary chunks that say how to read the colours; kept across an upscale."""

_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
_COLOUR_TYPE = {channels: colour_type for colour_type, channels in _CHANNELS.items()}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


class PNGError(ValueError):
    """The file is not a well-formed PNG."""


def is_png16(head: bytes) -> bool:
    """Whether the first 26+ bytes of a file are those of a PNG with 16 bits per sample."""
    return (len(head) >= 26 and head.startswith(SIGNATURE) and head[12:16] == b"IHDR"
            and head[24] == 16)


def _chunks(data: bytes) -> Iterable[tuple[bytes, bytes]]:
    if not data.startswith(SIGNATURE):
        raise PNGError("not a PNG file (bad signature)")
    pos = len(SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise PNGError("truncated PNG (incomplete chunk header)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise PNGError(f"truncated PNG (chunk {kind!r} cut short)")
        body = data[pos + 8:end]
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise PNGError(f"corrupt PNG (CRC mismatch in chunk {kind!r})")
        yield kind, body
        if kind == b"IEND":
            return
        pos = end + 4
    raise PNGError("truncated PNG (no IEND chunk)")


def _paeth_row(filtered: bytearray, prior: bytes, bpp: int) -> None:
    for i in range(len(filtered)):
        a = filtered[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        filtered[i] = (filtered[i] + pred) & 0xFF


def _average_row(filtered: bytearray, prior: bytes, bpp: int) -> None:
    for i in range(len(filtered)):
        a = filtered[i - bpp] if i >= bpp else 0
        filtered[i] = (filtered[i] + ((a + prior[i]) >> 1)) & 0xFF


def _unfilter(data: memoryview, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the per-row filters of one (sub)image: ``height`` rows of 1 + ``stride`` bytes."""
    out = np.empty((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        row = data[y * (stride + 1):(y + 1) * (stride + 1)]
        kind, filtered = row[0], np.frombuffer(row[1:], dtype=np.uint8)
        if kind == 0:
            cur = filtered.copy()
        elif kind == 1:
            cur = np.cumsum(filtered.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:
            cur = filtered + prior
        elif kind in (3, 4):
            buf = bytearray(filtered.tobytes())
            (_average_row if kind == 3 else _paeth_row)(buf, prior.tobytes(), bpp)
            cur = np.frombuffer(bytes(buf), dtype=np.uint8)
        else:
            raise PNGError(f"corrupt PNG (unknown row filter {kind})")
        out[y] = cur
        prior = out[y]
    return out


def read_png16(source: str | bytes | BinaryIO) -> tuple[np.ndarray, list[tuple[bytes, bytes]]]:
    """Decode a 16-bit PNG (a path, its bytes or an open binary file).

    Returns ``(pixels, colour_chunks)``: pixels are uint16, (H, W) for grey, (H, W, 2) grey+alpha,
    (H, W, 3) RGB or (H, W, 4) RGBA (a ``tRNS`` colour key becomes an alpha channel);
    colour_chunks are the ``(type, body)`` pairs of :data:`COLOUR_CHUNKS` found, in file order.
    Raises :class:`PNGError` for a malformed, truncated or non-16-bit file.
    """
    if isinstance(source, bytes):
        data = source
    elif hasattr(source, "read"):
        data = source.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    header, idat, trns, kept = None, [], None, []
    for kind, body in _chunks(data):
        if kind == b"IHDR":
            if len(body) != 13:
                raise PNGError("corrupt PNG (bad IHDR length)")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"tRNS":
            trns = body
        elif kind in COLOUR_CHUNKS:
            kept.append((kind, body))
    if header is None:
        raise PNGError("corrupt PNG (no IHDR chunk)")
    width, height, depth, colour_type, compression, filter_method, interlace = header
    if depth != 16 or colour_type not in _CHANNELS:
        raise PNGError(f"not a 16-bit grey/RGB PNG (bit depth {depth}, colour type {colour_type})")
    if compression != 0 or filter_method != 0 or interlace not in (0, 1):
        raise PNGError("corrupt PNG (unknown compression, filter or interlace method)")
    if width == 0 or height == 0:
        raise PNGError("corrupt PNG (zero width or height)")
    channels = _CHANNELS[colour_type]
    bpp = 2 * channels
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in passes]
    expected = sum(h * (1 + w * bpp) for w, h in sizes if w and h)
    try:
        decoder = zlib.decompressobj()
        raw = decoder.decompress(b"".join(idat), expected + 1)
    except zlib.error as err:
        raise PNGError(f"corrupt PNG (bad image data: {err})") from None
    if len(raw) < expected:
        raise PNGError("truncated PNG (image data ends early)")
    image = np.empty((height, width * bpp), dtype=np.uint8)
    view, pos = memoryview(raw), 0
    for (x0, y0, dx, dy), (w, h) in zip(passes, sizes):
        if not (w and h):
            continue
        sub = _unfilter(view[pos:pos + h * (1 + w * bpp)], h, w * bpp, bpp)
        pos += h * (1 + w * bpp)
        image.reshape(height, width, bpp)[y0::dy, x0::dx] = sub.reshape(h, w, bpp)
    pixels = image.view(">u2").reshape(height, width, channels).astype(np.uint16)
    if trns is not None and colour_type in (0, 2) and len(trns) == 2 * channels:
        key = np.frombuffer(trns, dtype=">u2").astype(np.uint16)
        alpha = np.where((pixels == key).all(axis=-1), 0, 65535).astype(np.uint16)
        pixels = np.concatenate([pixels, alpha[..., None]], axis=-1)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return pixels, kept


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def write_png16(dest: BinaryIO, pixels: np.ndarray,
                colour_chunks: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Write uint16 ``pixels`` — (H, W), (H, W, 1), (H, W, 2) grey+alpha, (H, W, 3) RGB or
    (H, W, 4) RGBA — to the binary file ``dest`` as a 16-bit PNG (Sub-filtered rows, zlib level
    6), with the given colour chunks (e.g. from :func:`read_png16`) before the image data."""
    if pixels.dtype != np.uint16:
        raise TypeError(f"expected uint16 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in _COLOUR_TYPE or 0 in pixels.shape:
        raise ValueError(f"expected (H, W) or (H, W, 1|2|3|4) pixels, got {pixels.shape}")
    height, width, channels = pixels.shape
    bpp = 2 * channels
    rows = np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8).reshape(height, width * bpp)
    filtered = rows.copy()
    filtered[:, bpp:] -= rows[:, :-bpp]
    framed = np.empty((height, 1 + width * bpp), dtype=np.uint8)
    framed[:, 0] = 1
    framed[:, 1:] = filtered
    dest.write(SIGNATURE)
    dest.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16,
                                          _COLOUR_TYPE[channels], 0, 0, 0)))
    for kind, body in colour_chunks:
        dest.write(_chunk(kind, body))
    dest.write(_chunk(b"IDAT", zlib.compress(framed.tobytes(), 6)))
    dest.write(_chunk(b"IEND", b""))
