"""Conversions between images as users hold them and the float tensors the network takes, and
reading/writing image files for the ``upscale`` command.

Every image is first brought to a numpy array (:func:`pil_to_array`); an array is split into a
colour part, (1, 3, H, W) float32 in [0, 1] (grey replicated to RGB), and an optional alpha part,
(1, 1, H, W) float32 (:func:`split_array`), and put back together in its original layout and
dtype afterwards (:func:`merge_array`, then :func:`array_to_pil`).
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
"""PIL modes :func:`camixer_fast.upscale` takes (and gives back)."""

EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
              ".tiff": "TIFF", ".bmp": "BMP"}
"""File extensions (lower case) the ``upscale`` command reads and writes, with Pillow's format."""

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights, as Pillow's RGB -> L conversion: how a grey image's RGB result is
turned back to grey."""

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
    """How an array was laid out, so that a result can be given back the same way."""

    dtype: np.dtype
    shape: tuple[int, ...]
    """The input's shape: (H, W) or (H, W, C), C in 1..4."""

    @property
    def channels(self) -> int:
        return 1 if len(self.shape) == 2 else self.shape[2]


@dataclass
class PILInfo:
    """What :func:`array_to_pil` needs to rebuild an image of the original mode."""

    mode: str
    source: Image.Image
    palette_rgba: np.ndarray | None = None
    """(K, 4) uint8: the colours of a P image's palette entries, transparency included."""


def check_range(values: Tensor, what: str) -> None:
    """Raise ValueError unless every value of ``values`` is in [0, 1] (NaN is not)."""
    lo, hi = float(values.min()), float(values.max())
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        raise ValueError(f"{what} must hold values in [0, 1], got min {lo}, max {hi}; "
                         "scale it (e.g. /255) or clip it first")


def scale_of(dtype: np.dtype) -> float | None:
    """The value that means full intensity for an integer dtype (255, 65535), None for floats."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype))


def split_array(arr: np.ndarray) -> tuple[Tensor, Tensor | None, ArrayLayout]:
    """An (H, W) or (H, W, C) array -> colour (1, 3, H, W) and alpha (1, 1, H, W) or None.

    C: 1 (grey), 2 (grey + alpha), 3 (RGB), 4 (RGBA). dtype: uint8, uint16 (full range) or a
    float dtype with values in [0, 1] (anything else raises ValueError: values are not clipped
    silently, since out-of-range floats usually mean 0..255 data). Both parts are float32 CPU
    tensors in [0, 1].
    """
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
    """Inverse of :func:`split_array` for results: colour (1, 3, h, w) and alpha (1, 1, h, w)
    in [0, 1] (clamped here) -> an array of the input's dtype and channel layout.

    A grey layout takes the BT.601 luma of the colour (:data:`LUMA`); integer dtypes are rounded
    to the nearest level (round(x·255), round(x·65535)).
    """
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
    """(K, 4) uint8: what each of the K palette entries of a P image looks like in RGBA."""
    entries = len(img.getpalette() or []) // 3 or 256
    strip = img.resize((entries, 1), Image.Resampling.NEAREST)
    strip.frombytes(bytes(range(entries)))
    return np.asarray(strip.convert("RGBA"))[0]


def pil_to_array(img: Image.Image) -> tuple[np.ndarray, PILInfo]:
    """A PIL image of a :data:`PIL_MODES` mode -> (H, W[, C]) array and what restores the mode.

    L -> (H, W) uint8, LA -> (H, W, 2), RGB -> (H, W, 3), RGBA -> (H, W, 4), I;16 -> (H, W)
    uint16; P -> RGB, or RGBA when its palette has any transparency.
    """
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
    """(h, w, 3|4) uint8 -> (h, w) uint8 indices of the nearest palette entries.

    Distances are Euclidean in alpha-premultiplied RGBA (an RGB image compares RGB only), so
    every fully transparent pixel goes to the nearest transparent entry whatever its colour.
    Ties go to the lower index. Pixels are processed in chunks to bound memory.
    """
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
    """Inverse of :func:`pil_to_array` for a result of any size.

    A P image is quantized back to its own palette (nearest entry, no dithering, see
    :func:`quantize`), keeping its palette and transparency; an ICC profile is kept.
    """
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
"""Ancillary PNG chunks that say how to read the colours; kept across an upscale."""


class PNGError(ValueError):
    """A file that is not a well-formed 16-bit PNG."""


def is_png16(head: bytes) -> bool:
    """Whether the first 26+ bytes of a file are those of a PNG with 16 bits per sample."""
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
    """Decode a 16-bit PNG (a path, its bytes or a binary file) with libpng (imagecodecs).

    Returns uint16 pixels, (H, W) grey, (H, W, 2) grey+alpha, (H, W, 3) RGB or (H, W, 4) RGBA
    (a ``tRNS`` colour key becomes alpha), and :func:`png_colour_chunks`. Raises
    :class:`PNGError` for a malformed, truncated or non-16-bit file.
    """
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
    """An image file read by :func:`read_image`: pixels for :func:`camixer_fast.upscale` (a
    PIL image, or a uint16 array for 16-bit PNGs) and what :func:`write_image` should keep."""

    pixels: Image.Image | np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None
    png_chunks: list[tuple[bytes, bytes]] = field(default_factory=list)


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read and fully decode an image file; raise (OSError, ValueError, ...) if it is corrupt,
    truncated or not an image.

    16-bit PNGs are decoded by :func:`read_png16` into uint16 arrays (Pillow would drop
    colour ones to 8 bits). Other files go through Pillow and are brought to a :data:`PIL_MODES`
    mode: 1 -> L, PA -> RGBA, CMYK/YCbCr/LAB/HSV -> RGB, I;16B/I;16L/I (values in 0..65535)
    -> I;16; other modes (e.g. F) raise ValueError.
    """
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
    """An image file as (H, W, 3) uint8 RGB, as SR benchmarks and training read their data:
    grey replicated, alpha and palettes resolved by Pillow's ``convert("RGB")``, 16-bit
    images (PNG, TIFF) rounded to 8 bits (round(v·255/65535)) rather than clipped. Raises
    what :func:`read_image` raises for a corrupt, truncated or non-image file."""
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
    """Make ``pixels`` writable as ``fmt`` (a value of :data:`EXTENSIONS`).

    Returns the pixels unchanged when the format holds them (16-bit arrays only as PNG), else
    the nearest writable form and a note saying what was lost (16 -> 8 bits, alpha, palette).
    """
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
    """Write ``image`` to the binary file ``dest`` in ``fmt`` (a value of :data:`EXTENSIONS`).

    Keeps the ICC profile, EXIF and PNG colour chunks; JPEG and WebP at quality 95, TIFF with
    LZW compression. Returns a note when the format cannot hold everything (see
    :func:`fit_to_format`), else None.
    """
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
