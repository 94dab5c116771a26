"""Images as users hold them <-> the network's float tensors, and image files for ``upscale``:
PIL -> array (:func:`pil_to_array`) -> colour (1, 3, H, W) + alpha (1, 1, H, W) float32
(:func:`split_array`), and back (:func:`merge_array`, :func:`array_to_pil`).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import imagecodecs
import numpy as np
import torch
from PIL import Image
from torch import Tensor

PIL_MODES = ("RGB", "L", "RGBA", "LA", "P", "I;16")

EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
              ".tiff": "TIFF", ".bmp": "BMP"}

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights (Pillow's RGB -> L): how a grey image's RGB result turns grey again."""

_WRITABLE_MODES = {
    "PNG": {"RGB", "RGBA", "L", "LA", "P", "I;16"},
    "TIFF": {"RGB", "RGBA", "L", "LA", "P", "I;16"},
    "WEBP": {"RGB", "RGBA", "L", "LA", "P"},
    "BMP": {"RGB", "L", "P"},
    "JPEG": {"RGB", "L"},
}
_CONVERTED_ON_READ = {"1": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
                      "HSV": "RGB", "RGBX": "RGB", "RGBa": "RGBA", "La": "LA"}


@dataclass
class ArrayLayout:

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return 1 if len(self.shape) == 2 else self.shape[2]


@dataclass
class PILInfo:

    mode: str
    source: Image.Image
    palette_rgba: np.ndarray | None = None


def check_range(values: Tensor, what: str) -> None:
    """Raise ValueError unless every value of ``values`` is in [0, 1] (NaN is not)."""
    lo, hi = float(values.min()), float(values.max())
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        raise ValueError(f"{what} must hold values in [0, 1], got min {lo}, max {hi}; "
                         "scale it (e.g. /255) or clip it first")


def scale_of(dtype: np.dtype) -> float | None:
    """Full intensity of an integer dtype (255, 65535), None for floats."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype))


def split_array(arr: np.ndarray) -> tuple[Tensor, Tensor | None, ArrayLayout]:
    """(H, W[, C]) array, C in 1..4, uint8/uint16/float in [0, 1] -> colour (1, 3, H, W) and
    alpha (1, 1, H, W) or None, float32 in [0, 1]. Out-of-range floats raise ValueError (they
    usually mean 0..255 data)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(arr).__name__}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and not 1 <= arr.shape[2] <= 4):
        raise ValueError(f"expected an (H, W) or (H, W, C) array with C in 1..4, got shape "
                         f"{arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    full = scale_of(arr.dtype)
    if full is None and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"expected a uint8, uint16 or float array, got dtype {arr.dtype}")
    layout = ArrayLayout(arr.dtype, arr.shape)
    values = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if full is None:
        check_range(values, "a float array")
    else:
        values = values / full
    if values.dim() == 2:
        values = values[..., None]
    values = values.permute(2, 0, 1)[None]
    channels = values.shape[1]
    colour = values[:, :3] if channels >= 3 else values[:, :1].expand(-1, 3, -1, -1)
    alpha = values[:, channels - 1:] if channels in (2, 4) else None
    return colour.contiguous(), alpha, layout


def merge_array(colour: Tensor, alpha: Tensor | None, layout: ArrayLayout) -> np.ndarray:
    """Colour (1, 3, h, w) and alpha (1, 1, h, w), clamped to [0, 1] -> an array of
    ``layout``'s dtype and channels (grey: :data:`LUMA`; integers rounded to the nearest level)."""
    rgb = colour[0].detach().to("cpu", torch.float32).clamp(0, 1)
    if layout.channels <= 2:
        weights = torch.tensor(LUMA, dtype=torch.float32).view(3, 1, 1)
        rgb = (rgb * weights).sum(0, keepdim=True).clamp(0, 1)
    planes = [rgb]
    if alpha is not None:
        planes.append(alpha[0].detach().to("cpu", torch.float32).clamp(0, 1))
    out = torch.cat(planes).permute(1, 2, 0).numpy()
    full = scale_of(layout.dtype)
    if full is not None:
        out = np.rint(out * full).astype(layout.dtype)
    else:
        out = out.astype(layout.dtype)
    return np.ascontiguousarray(out[..., 0] if len(layout.shape) == 2 else out)


def palette_rgba(img: Image.Image) -> np.ndarray:
    """(K, 4) uint8: the K palette entries of a P image in RGBA."""
    entries = len(img.getpalette() or []) // 3 or 256
    strip = img.resize((entries, 1), Image.Resampling.NEAREST)
    strip.frombytes(bytes(range(entries)))
    return np.asarray(strip.convert("RGBA"))[0]


def pil_to_array(img: Image.Image) -> tuple[np.ndarray, PILInfo]:
    """A :data:`PIL_MODES` image -> (H, W[, C]) array (I;16: uint16; P: RGB, or RGBA when its
    palette has transparency) and what restores the mode."""
    if img.mode not in PIL_MODES:
        raise ValueError(f"PIL mode {img.mode!r} is not supported; supported: {PIL_MODES} "
                         "(convert it first, e.g. img.convert('RGB'))")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"empty image of size {img.size}")
    info = PILInfo(img.mode, img)
    if img.mode == "P":
        info.palette_rgba = palette_rgba(img)
        has_alpha = bool((info.palette_rgba[:, 3] < 255).any())
        return np.asarray(img.convert("RGBA" if has_alpha else "RGB")), info
    arr = np.asarray(img)
    if img.mode == "I;16":
        arr = arr.astype(np.uint16)
    return arr, info


def quantize(arr: np.ndarray, palette_rgba: np.ndarray) -> np.ndarray:
    """(h, w, 3|4) uint8 -> (h, w) uint8 indices of the nearest palette entries, in
    alpha-premultiplied RGBA (transparent pixels go to a transparent entry); ties: lower index."""
    channels = arr.shape[-1]
    pixels = arr.reshape(-1, channels).astype(np.float32)
    entries = palette_rgba[:, :channels].astype(np.float32)
    if channels == 4:
        pixels[:, :3] *= pixels[:, 3:] / 255.0
        entries[:, :3] *= entries[:, 3:] / 255.0
    entry_norms = (entries ** 2).sum(1)
    out = np.empty(len(pixels), dtype=np.uint8)
    step = 1 << 16
    for start in range(0, len(pixels), step):
        chunk = pixels[start:start + step]
        dist = entry_norms[None, :] - 2.0 * chunk @ entries.T
        out[start:start + step] = dist.argmin(1)
    return out.reshape(arr.shape[:2])


def array_to_pil(arr: np.ndarray, info: PILInfo) -> Image.Image:
    """Inverse of :func:`pil_to_array` for a result of any size (P: :func:`quantize`d back to
    its own palette; the ICC profile kept)."""
    if info.mode == "P":
        out = info.source.resize((arr.shape[1], arr.shape[0]), Image.Resampling.NEAREST)
        out.frombytes(quantize(arr, info.palette_rgba).tobytes())
    elif info.mode == "I;16":
        out = Image.fromarray(arr.astype(np.uint16))
    else:
        out = Image.fromarray(arr)
    if out.mode != info.mode:
        raise AssertionError(f"rebuilt mode {out.mode} != {info.mode}")
    if "icc_profile" in info.source.info:
        out.info["icc_profile"] = info.source.info["icc_profile"]
    return out

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_CHUNKS = (b"iCCP", b"sRGB", b"gAMA", b"cHRM")


class PNGError(ValueError):
    """A malformed or non-16-bit PNG."""


def is_png16(head: bytes) -> bool:
    """Whether a file's first 26+ bytes are those of a 16-bit PNG."""
    return (len(head) >= 26 and head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR"
            and head[24] == 16)


def png_colour_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, body) pairs of :data:`PNG_COLOUR_CHUNKS` in a PNG's bytes, in file order."""
    kept, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind in (b"IDAT", b"IEND"):  # colour chunks must come before the image data
            break
        if kind in PNG_COLOUR_CHUNKS:
            kept.append((kind, bytes(data[pos + 8:pos + 8 + length])))
        pos += 12 + length
    return kept


def read_png16(source: str | os.PathLike | bytes | BinaryIO
               ) -> tuple[np.ndarray, list[tuple[bytes, bytes]]]:
    """A 16-bit PNG (path, bytes or binary file) -> uint16 (H, W[, 2|3|4]) pixels (a tRNS key
    becomes alpha) and its colour chunks; PNGError for a malformed or non-16-bit file."""
    if isinstance(source, bytes):
        data = source
    elif hasattr(source, "read"):
        data = source.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    if not is_png16(data[:32]):
        raise PNGError("not a 16-bit PNG")
    try:
        pixels = imagecodecs.png_decode(data)
    except (imagecodecs.PngError, ValueError) as err:  # libpng's messages may not decode
        raise PNGError(f"corrupt or truncated 16-bit PNG ({type(err).__name__})") from None
    return pixels.astype(np.uint16, copy=False), png_colour_chunks(data)


def write_png16(dest: BinaryIO, pixels: np.ndarray,
                colour_chunks: list[tuple[bytes, bytes]] | tuple = ()) -> None:
    """Write uint16 (H, W), (H, W, 1|2|3|4) ``pixels`` to ``dest`` as a 16-bit PNG (zlib level
    6), with ``colour_chunks`` placed right after IHDR."""
    if pixels.dtype != np.uint16:
        raise TypeError(f"expected uint16 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] > 4) or 0 in pixels.shape:
        raise ValueError(f"expected (H, W) or (H, W, 1|2|3|4) pixels, got {pixels.shape}")
    encoded = imagecodecs.png_encode(np.ascontiguousarray(pixels), level=6)
    after_ihdr = len(PNG_SIGNATURE) + 25
    dest.write(encoded[:after_ihdr])
    for kind, body in colour_chunks:
        dest.write(struct.pack(">I", len(body)) + kind + body
                   + struct.pack(">I", zlib.crc32(kind + body)))
    dest.write(encoded[after_ihdr:])


@dataclass
class LoadedImage:
    """A file read by :func:`read_image`: a PIL image (or uint16 array for 16-bit PNGs) and
    what :func:`write_image` keeps."""

    pixels: Image.Image | np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None
    png_chunks: list[tuple[bytes, bytes]] = field(default_factory=list)


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read and decode an image file (OSError, ValueError, ... if corrupt, truncated or not an
    image): 16-bit PNGs by :func:`read_png16`, the rest by Pillow brought to a
    :data:`PIL_MODES` mode (other modes, e.g. F, raise ValueError)."""
    with open(path, "rb") as f:
        if is_png16(f.read(32)):
            f.seek(0)
            pixels, chunks = read_png16(f)
            return LoadedImage(pixels, png_chunks=chunks)
    with Image.open(path) as img:
        img.load()
        icc, exif = img.info.get("icc_profile"), img.info.get("exif")
        if img.mode in _CONVERTED_ON_READ:
            img = img.convert(_CONVERTED_ON_READ[img.mode])
        elif img.mode.startswith("I") and img.mode != "I;16":
            values = np.asarray(img)
            if values.ndim != 2 or values.min() < 0 or values.max() > 65535:
                raise ValueError(f"mode {img.mode} with values outside 0..65535 is not supported")
            img = Image.fromarray(values.astype(np.uint16))
        elif img.mode not in PIL_MODES:
            raise ValueError(f"image mode {img.mode} is not supported")
        else:
            img = img.copy()
    return LoadedImage(img, icc_profile=icc if isinstance(icc, bytes) else None,
                       exif=exif if isinstance(exif, bytes) else None)




def _to_8bit(arr: np.ndarray) -> np.ndarray:
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, as SR benchmarks read it (Pillow's
    ``convert("RGB")``; 16 bits rounded to 8). Raises what :func:`read_image` raises."""
    pixels = read_image(path).pixels
    if isinstance(pixels, Image.Image) and pixels.mode == "I;16":
        pixels = np.asarray(pixels).astype(np.uint16)
    if isinstance(pixels, np.ndarray):
        pixels = _to_8bit(pixels)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        channels = pixels.shape[2]
        rgb = pixels[..., :1].repeat(3, axis=2) if channels <= 2 else pixels[..., :3]
        return np.ascontiguousarray(rgb)
    return np.asarray(pixels.convert("RGB"))


def fit_to_format(pixels: Image.Image | np.ndarray,
                  fmt: str) -> tuple[Image.Image | np.ndarray, str | None]:
    """``pixels`` in the nearest form ``fmt`` (an :data:`EXTENSIONS` value) holds, and a note
    of what was lost (16 -> 8 bits, alpha, palette) or None."""
    notes = []
    if isinstance(pixels, np.ndarray):
        if fmt == "PNG":
            return pixels, None
        if pixels.ndim == 2 and fmt == "TIFF":
            return Image.fromarray(pixels), None
        notes.append("16 -> 8 bits")
        pixels = Image.fromarray(_to_8bit(pixels))
    allowed = _WRITABLE_MODES[fmt]
    if pixels.mode == "P" and "transparency" in pixels.info and fmt not in ("PNG", "WEBP"):
        notes.append("palette dropped")
        pixels = pixels.convert("RGBA")
    if pixels.mode not in allowed:
        mode = pixels.mode
        if mode == "I;16":
            notes.append("16 -> 8 bits")
            pixels = Image.fromarray(_to_8bit(np.asarray(pixels).astype(np.uint16)))
        if pixels.mode not in allowed:
            alpha = pixels.mode in ("RGBA", "LA") or (
                pixels.mode == "P" and pixels.convert("RGBA").getextrema()[3][0] < 255)
            grey = pixels.mode in ("L", "LA")
            target = ("RGBA" if alpha and "RGBA" in allowed
                      else "L" if grey and "L" in allowed else "RGB")
            if alpha and target != "RGBA":
                notes.append("alpha dropped")
            if pixels.mode == "P" and "palette dropped" not in notes:
                notes.append("palette dropped")
            pixels = pixels.convert(target)
    return pixels, ("; ".join(notes) or None)


def write_image(image: LoadedImage, dest: BinaryIO, fmt: str) -> str | None:
    """Write ``image`` to ``dest`` in ``fmt`` keeping ICC, EXIF and PNG colour chunks (JPEG/WebP
    quality 95, TIFF LZW); returns :func:`fit_to_format`'s note."""
    pixels, note = fit_to_format(image.pixels, fmt)
    if isinstance(pixels, np.ndarray):
        write_png16(dest, pixels, image.png_chunks)
        return note
    options: dict = {}
    if image.icc_profile and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        options["icc_profile"] = image.icc_profile
    if image.exif and fmt in ("PNG", "JPEG", "WEBP"):
        options["exif"] = image.exif
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = 95
    if fmt == "TIFF":
        options["compression"] = "tiff_lzw"
    if pixels.mode == "P" and "transparency" in pixels.info and fmt in ("PNG", "WEBP", "TIFF"):
        options["transparency"] = pixels.info["transparency"]
    pixels.save(dest, format=fmt, **options)
    return note
