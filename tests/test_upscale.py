"""camixer_fast.upscale: every input kind, rounding and ranges, the model cache, errors, tiling."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import camixer_fast
from camixer_fast.io.image import LUMA, palette_rgba, quantize

from camixer_fast.inference import api as up
from camixer_fast.inference import tiling

H, W = 12, 17


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rgb8() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def alpha8() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (H, W), dtype=np.uint8)


def float_run(rgb: np.ndarray, gamma: float = 0.5) -> np.ndarray:
    """The reference result: float32 RGB in [0, 1] through the network, clamped, (sH, sW, 3)."""
    out = camixer_fast.upscale(rgb.astype(np.float32), gamma)
    assert out.dtype == np.float32
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(1.0 / mse)


def assert_16bit(out: np.ndarray) -> None:
    """Most unsaturated levels of a 16-bit result are not multiples of 257 (8-bit levels)."""
    inside = out[(out > 0) & (out < 65535)]
    assert inside.size > 0.5 * out.size and (inside % 257 != 0).mean() > 0.9, \
        "the result was squashed to 8 bits"


def bicubic_alpha(alpha: np.ndarray, full: float) -> np.ndarray:
    t = torch.from_numpy(alpha.astype(np.float32) / full)[None, None]
    return F.interpolate(t, scale_factor=4, mode="bicubic", align_corners=False)[0, 0].numpy()


# --- PIL images ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "I;16"])
def test_pil_mode_round_trip(mode, rgb8, alpha8):
    if mode == "I;16":
        img = Image.fromarray(rgb8[..., 0].astype(np.uint16) * 257 + 100)
    else:
        img = Image.fromarray(rgb8).convert(mode)
        if "A" in mode:
            img.putalpha(Image.fromarray(alpha8))
    out = camixer_fast.upscale(img)
    assert isinstance(out, Image.Image)
    assert out.mode == mode and out.size == (4 * W, 4 * H)


def test_pil_rgb_matches_float_path(rgb8):
    out = np.asarray(camixer_fast.upscale(Image.fromarray(rgb8)))
    ref = np.rint(float_run(rgb8 / 255.0) * 255)
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_pil_grey_is_run_as_rgb_and_brought_back_with_luma(rgb8):
    grey = rgb8[..., 0]
    out = np.asarray(camixer_fast.upscale(Image.fromarray(grey)))
    assert out.dtype == np.uint8 and out.shape == (4 * H, 4 * W)
    sr = float_run(np.repeat(grey[..., None], 3, axis=2) / 255.0)
    ref = np.rint(np.clip((sr * np.array(LUMA, dtype=np.float32)).sum(-1), 0, 1) * 255)
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_pil_alpha_is_bicubic_and_colour_unchanged_by_it(rgb8, alpha8):
    rgba = np.dstack([rgb8, alpha8])
    out = np.asarray(camixer_fast.upscale(Image.fromarray(rgba)))
    plain = np.asarray(camixer_fast.upscale(Image.fromarray(rgb8)))
    np.testing.assert_array_equal(out[..., :3], plain)
    ref = np.rint(np.clip(bicubic_alpha(alpha8, 255.0), 0, 1) * 255)
    assert np.abs(out[..., 3].astype(int) - ref).max() <= 1


def test_pil_16bit_grey_keeps_16_bits(rgb8):
    grey16 = rgb8[..., 0].astype(np.uint16) * 257 + 100
    out = np.asarray(camixer_fast.upscale(Image.fromarray(grey16)))
    assert out.dtype == np.uint16 and out.max() > 255
    assert_16bit(out)
    sr = float_run(np.repeat(grey16[..., None], 3, axis=2) / 65535.0)
    ref = np.rint(np.clip((sr * np.array(LUMA, dtype=np.float32)).sum(-1), 0, 1) * 65535)
    assert np.abs(out.astype(np.int64) - ref).max() <= 1


@pytest.mark.parametrize("transparent", [False, True], ids=["opaque", "transparency-index"])
def test_pil_palette_image_is_requantized_to_its_palette(rgb8, transparent):
    img = Image.fromarray(rgb8).quantize(colors=16)
    if transparent:
        img.info["transparency"] = 3
    out = camixer_fast.upscale(img)
    assert out.mode == "P" and out.size == (4 * W, 4 * H)
    assert out.getpalette() == img.getpalette()
    assert out.info.get("transparency") == img.info.get("transparency")
    indices = np.asarray(out)
    assert indices.max() < len(img.getpalette()) // 3
    source = np.asarray(img.convert("RGBA" if transparent else "RGB"))
    expected = np.rint(float_run(source[..., :3] / 255.0) * 255)
    if transparent:
        alpha = np.rint(np.clip(bicubic_alpha(source[..., 3], 255.0), 0, 1) * 255)
        expected = np.dstack([expected, alpha])
        assert 0.02 < (indices == 3).mean() < 0.5, "transparent pixels lost or spread"
    expected = quantize(expected.astype(np.uint8), palette_rgba(img))
    assert (indices == expected).mean() > 0.99


def test_pil_palette_nearest_entry():
    palette = np.array([[0, 0, 0, 255], [255, 0, 0, 255], [0, 0, 255, 255], [0, 0, 0, 0]],
                       dtype=np.uint8)
    pixels = np.array([[[250, 10, 5, 255], [3, 4, 200, 250], [200, 10, 10, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(quantize(pixels, palette), [[1, 2, 3]])
    np.testing.assert_array_equal(quantize(pixels[..., :3], palette), [[1, 2, 1]])


def test_pil_icc_profile_is_kept(rgb8):
    img = Image.fromarray(rgb8)
    img.info["icc_profile"] = b"fake profile"
    assert camixer_fast.upscale(img).info["icc_profile"] == b"fake profile"


# --- numpy arrays ----------------------------------------------------------------------------

SHAPES = {"HW": (H, W), "HW1": (H, W, 1), "HW2": (H, W, 2), "HW3": (H, W, 3),
          "HW4": (H, W, 4)}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64],
                         ids=["uint8", "uint16", "float32", "float64"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_numpy_shape_and_dtype_round_trip(layout, dtype):
    rng = np.random.default_rng(2)
    shape = SHAPES[layout]
    if np.issubdtype(dtype, np.integer):
        arr = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    else:
        arr = rng.random(shape).astype(dtype)
    out = camixer_fast.upscale(arr)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    assert out.shape == (4 * H, 4 * W) + shape[2:]
    if not np.issubdtype(dtype, np.integer):
        assert out.min() >= 0 and out.max() <= 1


def test_numpy_uint8_rounds_to_nearest_level(rgb8):
    ref = float_run(rgb8 / 255.0)
    np.testing.assert_array_equal(camixer_fast.upscale(rgb8), np.rint(ref * 255).astype(np.uint8))


def test_numpy_uint16_keeps_full_range():
    rgb16 = np.random.default_rng(3).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    out = camixer_fast.upscale(rgb16)
    assert out.dtype == np.uint16 and out.max() > 255
    assert_16bit(out)
    ref = np.rint(float_run(rgb16 / 65535.0) * 65535)
    assert np.abs(out.astype(np.int64) - ref).max() <= 1


def test_numpy_float_matches_tensor_path(rgb8):
    # an array runs on the default device (CUDA where there is one), a tensor on its own:
    # pinned to the CPU, both paths are the same computation and agree bit for bit
    arr = (rgb8 / 255.0).astype(np.float32)
    out = camixer_fast.upscale(arr, 0.25, device="cpu")
    ref = camixer_fast.upscale(torch.from_numpy(arr).permute(2, 0, 1), 0.25)
    np.testing.assert_array_equal(out, ref.permute(1, 2, 0).numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_numpy_on_cuda_is_close_to_the_cpu_path(rgb8):
    arr = (rgb8 / 255.0).astype(np.float32)
    out = camixer_fast.upscale(arr, 0.25, device="cuda")
    ref = camixer_fast.upscale(arr, 0.25, device="cpu")
    # different kernels and summation orders (the GPU run of issue 9: 1.4e-3 apart)
    assert np.abs(out - ref).max() < 5e-3


# --- tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, H, W), (2, 3, H, W)], ids=["3D", "4D"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["float32", "float64", "float16"])
def test_tensor_round_trip(shape, dtype):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = camixer_fast.upscale(x)
    assert out.shape == shape[:-2] + (4 * H, 4 * W)
    assert out.dtype == dtype and out.device == x.device
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    out.add_(0)  # a normal tensor, usable outside inference mode


def test_tensor_batch_is_per_image():
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(5))
    both = camixer_fast.upscale(x)
    torch.testing.assert_close(both[1], camixer_fast.upscale(x[1]), rtol=0, atol=0)


def test_tensor_matches_model_clamped(model_s):
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(6))
    model_s.gamma = 0.75
    with torch.inference_mode():
        ref = model_s(x).clamp(0, 1)
    torch.testing.assert_close(camixer_fast.upscale(x, 0.75, backend="reference"), ref,
                               rtol=0, atol=0)


def test_dtype_names_and_device_default(rgb8):
    assert up.resolve_dtype("bf16") is torch.bfloat16 and up.resolve_dtype(None) is torch.float32
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert up.resolve_device(None).type == expected
    assert up.resolve_device(None, torch.zeros(1)).type == "cpu"


# --- errors ----------------------------------------------------------------------------------

BAD_INPUTS = {
    "numpy-5-channels": (np.zeros((H, W, 5), np.uint8), ValueError, "C in 1..4"),
    "numpy-4D": (np.zeros((1, H, W, 3), np.uint8), ValueError, "array"),
    "numpy-empty": (np.zeros((0, W, 3), np.uint8), ValueError, "empty"),
    "numpy-int32": (np.zeros((H, W, 3), np.int32), TypeError, "dtype int32"),
    "numpy-float-above-1": (np.full((H, W, 3), 1.5, np.float32), ValueError, r"\[0, 1\]"),
    "numpy-float-negative": (np.full((H, W), -0.1), ValueError, r"\[0, 1\]"),
    "numpy-float-nan": (np.full((H, W, 3), np.nan, np.float32), ValueError, r"\[0, 1\]"),
    "tensor-1-channel": (torch.zeros(1, H, W), ValueError, r"\(3, H, W\)"),
    "tensor-4-channels": (torch.zeros(2, 4, H, W), ValueError, r"\(3, H, W\)"),
    "tensor-5D": (torch.zeros(1, 1, 3, H, W), ValueError, r"\(3, H, W\)"),
    "tensor-uint8": (torch.zeros(3, H, W, dtype=torch.uint8), TypeError, "float"),
    "tensor-above-1": (torch.full((3, H, W), 2.0), ValueError, r"\[0, 1\]"),
    "pil-mode-F": (Image.new("F", (W, H)), ValueError, "mode 'F'"),
    "pil-mode-CMYK": (Image.new("CMYK", (W, H)), ValueError, "mode 'CMYK'"),
    "list": ([[0.0]], TypeError, "PIL image, a numpy array or a torch tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises(name):
    img, error, match = BAD_INPUTS[name]
    with pytest.raises(error, match=match):
        camixer_fast.upscale(img)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "half"], ids=str)
def test_gamma_outside_unit_interval_raises(gamma, rgb8):
    with pytest.raises(ValueError, match="gamma"):
        camixer_fast.upscale(rgb8, gamma)


@pytest.mark.parametrize("tile", [0, -16, 2.5, "big", True], ids=repr)
def test_bad_tile_raises(tile, rgb8):
    with pytest.raises(ValueError, match="tile"):
        camixer_fast.upscale(rgb8, tile=tile)


def test_bad_dtype_raises(rgb8):
    with pytest.raises(ValueError, match="dtype"):
        camixer_fast.upscale(rgb8, dtype="fp8")


def test_unknown_weights_name_raises_checkpoint_error(rgb8):
    with pytest.raises(camixer_fast.CheckpointError, match="no-such-model"):
        camixer_fast.upscale(rgb8, weights="no-such-model")


# --- the model cache -------------------------------------------------------------------------

def test_model_is_loaded_once_per_configuration(monkeypatch, rgb8, weights_path):
    calls = []
    real = up.load_model

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(up, "load_model", counting)
    up.clear_model_cache()
    first = camixer_fast.upscale(rgb8, 0.0)
    camixer_fast.upscale(Image.fromarray(rgb8), 1.0)
    again = camixer_fast.upscale(rgb8, 0.0)
    assert len(calls) == 1, "the second call reloaded the model"
    np.testing.assert_array_equal(first, again)
    camixer_fast.upscale(rgb8, 0.5, weights=weights_path)
    camixer_fast.upscale(rgb8, 0.5, weights=str(weights_path))
    assert len(calls) == 2, "a weights path is keyed on the file"
    camixer_fast.upscale(rgb8, 0.5, dtype=torch.float64)
    assert len(calls) == 3 and calls[-1][1]["dtype"] is torch.float64


def test_gamma_is_set_per_call(rgb8):
    at_zero = camixer_fast.upscale(rgb8 / 255.0, 0.0)
    at_one = camixer_fast.upscale(rgb8 / 255.0, 1.0)
    assert not np.array_equal(at_zero, at_one)
    np.testing.assert_array_equal(camixer_fast.upscale(rgb8 / 255.0, 0.0), at_zero)


# --- tiling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size,tile,origins", [
    (64, 64, [0]), (90, 64, [0, 26]), (128, 64, [0, 60, 64]), (200, 64, [0, 60, 120, 136]),
    (20, 8, [0, 8, 12]),
], ids=lambda v: str(v))
def test_tile_origins_follow_spec(size, tile, origins):
    assert tiling.tile_origins(size, tile) == origins


class NearestX4(nn.Module):
    """A translation-equivariant stand-in: tiles of it must reassemble the whole exactly."""

    scale = 4

    def forward(self, x):
        return F.interpolate(x, scale_factor=4, mode="nearest")


@pytest.mark.parametrize("tile", [5, 8, 16, 100], ids=lambda t: f"T{t}")
def test_tiles_are_averaged_back_to_the_whole(tile):
    x = torch.rand(2, 3, 23, 37, generator=torch.Generator().manual_seed(7))
    seen = []
    out = tiling.tiled_forward(NearestX4(), x, tile, lambda done, total: seen.append((done, total)))
    torch.testing.assert_close(out, NearestX4()(x), rtol=0, atol=1e-6)
    total = len(tiling.tile_origins(23, min(tile, 23))) * len(tiling.tile_origins(37, min(tile, 37)))
    assert seen == [(i + 1, total) for i in range(total)]


class Shapes(NearestX4):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return super().forward(x)


@pytest.mark.parametrize("size,tile,shape", [
    ((1, 500), 64, (1, 64)), ((200, 30), 64, (64, 30)), ((40, 40), 64, (40, 40)),
    ((90, 90), 64, (64, 64))], ids=["1x500", "200x30", "square-under-T", "square-over-T"])
def test_tiles_are_TxT_clipped_to_the_image(size, tile, shape):
    """A thin image keeps T along its long side (1x1 tiles made 1x500 at T=64 take 15 s, not 2);
    a square image's tiles are min(T, side) square, as before."""
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(3))
    model = Shapes()
    out = tiling.tiled_forward(model, x, tile)
    torch.testing.assert_close(out, NearestX4()(x), rtol=0, atol=1e-6)
    rows = tiling.tile_origins(size[0], shape[0])
    cols = tiling.tile_origins(size[1], shape[1])
    assert model.seen == [shape] * (len(rows) * len(cols))


def test_one_tile_is_the_untiled_run(rgb8):
    square = rgb8[:, :H]
    np.testing.assert_array_equal(camixer_fast.upscale(square, tile=64),
                                  camixer_fast.upscale(square))


def test_tiled_output_is_seamless(shared):
    """Official tiles (T = 64, overlap 4) of a 128×128 Set14 crop vs the whole image at γ = 0.5.

    Tiles differ from the whole image everywhere, not only at seams: every tile has its own
    window grid and its own routing (K, ranking); 42.1 dB here."""
    crop = np.asarray(Image.open(shared / "data" / "Set14" / "HR" / "comic.png")
                      .convert("RGB"))[:128, :128]
    x = (crop / 255.0).astype(np.float32)
    calls = []
    tiled = camixer_fast.upscale(x, tile=64, progress=lambda d, n: calls.append((d, n)))
    whole = camixer_fast.upscale(x)
    assert calls[-1] == (9, 9)
    value = psnr(tiled, whole)
    print(f"tiled (T=64) vs whole: {value:.2f} dB")
    assert value >= 40.0


def test_auto_tile_rule():
    use = tiling.MEMORY_USE["cpu"]
    assert tiling.auto_tile(100, 100, budget=1 << 40) is None
    whole = use.overhead + 100 * 100 * (use.per_pixel + 3 * 16 * 4)
    assert tiling.forward_bytes(100 * 100, outputs=100 * 100) == whole
    assert tiling.auto_tile(100, 100, budget=whole) is None
    assert tiling.auto_tile(100, 100, budget=whole - 1) == 96
    budget = use.overhead + 1000 * 1000 * 3 * 16 * 4 + 200 * 200 * use.per_pixel
    assert tiling.auto_tile(1000, 1000, budget=budget) == 192
    assert tiling.auto_tile(1000, 1000, budget=0) == 16
    half = use.overhead + 1000 * 1000 * 3 * 16 * 4 + 200 * 200 * use.per_pixel // 2
    assert tiling.auto_tile(1000, 1000, dtype=torch.float16, budget=half) == 192
    assert tiling.auto_tile(1, 5000, budget=use.overhead + 5000 * 192 + 64 * use.per_pixel) == 64
    assert tiling.available_memory(torch.device("cpu")) > 0


@pytest.mark.parametrize("room_mib,whole", [(1930, True), (470, False)],
                         ids=["ulimit-3GB", "ulimit-1.4GB"])
def test_auto_tile_plans_what_a_forward_takes(monkeypatch, room_mib, whole):
    """1024x768 at fp32 on the CPU: a whole forward of S grows VmPeak by 976 MiB (1302 B per
    pixel, output included; 193 MiB at 256x256). Under ``ulimit -v 3000000`` (about 1930 MiB
    of room beside the command) it fits whole; it was tiled (6 kB a pixel, half the room).
    With 470 MiB of room tiles are needed, and large ones fit."""
    estimate = tiling.forward_bytes(1024 * 768, outputs=1024 * 768)
    assert 976 << 20 < estimate < 1.5 * (976 << 20)
    assert 193 << 20 < tiling.forward_bytes(256 * 256, outputs=256 * 256) < 1.5 * (193 << 20)
    monkeypatch.setattr(tiling, "available_memory", lambda device: room_mib << 20)
    tile = tiling.auto_tile(768, 1024)
    assert tile is None if whole else 256 <= tile < 768


def test_auto_tile_on_a_small_image_is_untiled(rgb8):
    calls = []
    out = camixer_fast.upscale(rgb8, tile="auto", progress=lambda d, n: calls.append((d, n)))
    np.testing.assert_array_equal(out, camixer_fast.upscale(rgb8))
    assert calls == [(1, 1)]
