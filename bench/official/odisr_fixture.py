"""Run the official CAMixerOSR on seeded random weights; save ``tests/data/odisr_official.pt``.

    CAMIXER_OFFICIAL_ODISR_ARCH=<checkout>/codes/odisr/archs/CAMixerOSR_arch.py \
        python bench/official/odisr_fixture.py          # einops, ../shared/data

The official file (icandle/CAMixerSR d690b12) runs unchanged; its basicsr imports are stubbed
(``DCNv2Pack`` as BasicSR's module over torchvision's ``deform_conv2d``, written here with
``grid_sample``, independent of camixer_fast). Its K is int(N·r), r the mean of a hard
``gumbel_softmax``; during its forward ``F.gumbel_softmax`` returns the noise-free expectation
softmax(logits) for γ = 0.5 (our expected routing) and class 0 everywhere for γ = 1 (K = N).
Sizes off the 16-grid go in padded (image and condition: it pads only the image), output cropped.
WS-PSNR / WS-SSIM come from ``metrics/odi_metric.py`` beside ``archs/`` (cv2 stubbed by numpy).
"""

from __future__ import annotations

import importlib.util
import math
import os
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from camixer_fast.reference.model import pad_to_multiple
from camixer_fast.reference.odisr import CAMixerOSR
from official_code import flow_warp, stubbed_modules
from PIL import Image
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "CAMIXER_OFFICIAL_ODISR_ARCH"
FIXTURE = REPO / "tests" / "data" / "odisr_official.pt"
SEED = 2024
CONFIGS = {"tiny": {"n_feats": 12, "blocks_per_group": (2,)},
           "small": {"n_feats": 24, "blocks_per_group": (2, 2)},
           "published": {"n_feats": 60, "blocks_per_group": (6, 6, 6, 6)}}
# name: (config, scale, Set14 image, (top, left, height, width) of the crop, panorama rows or None)
CASES = {
    "small_x2_32x64": ("small", 2, "barbara", (100, 200, 32, 64), None),
    "small_x2_20x40": ("small", 2, "comic", (40, 60, 20, 40), (7, 64)),
    "small_x4_16x32": ("small", 4, "baboon", (300, 100, 16, 32), (40, 96)),
    "small_x4_20x40": ("small", 4, "barbara", (333, 411, 20, 40), None),
    "published_x4_16x32": ("published", 4, "zebra", (200, 300, 16, 32), None),
    "published_x2_20x24": ("published", 2, "lenna", (250, 250, 20, 24), (30, 80)),
}
GAMMAS = (0.5, 1.0)
METRIC_SHAPES = {"rgb_32x48": (32, 48, 3), "rgb_21x17": (21, 17, 3), "rgb_64x128": (64, 128, 3)}


def metric_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uint8 pair (image, reference) of ``METRIC_SHAPES[name]``."""
    rng = np.random.default_rng(sorted(METRIC_SHAPES).index(name))
    ref = rng.integers(0, 256, size=METRIC_SHAPES[name])
    noise = rng.integers(-40, 41, size=ref.shape)
    return np.clip(ref + noise, 0, 255).astype(np.uint8), ref.astype(np.uint8)


def seeded_state_dict(config: str, scale: int, seed: int = SEED) -> dict[str, Tensor]:
    """Official-layout weights, the same on every machine: N(0, 1/fan_in) (Q, K /4: logits of a
    few units, not a near-argmax amplifying fp32 rounding), biases N(0, 0.1²), norms 1 + N(0,
    0.1²), DCN ``conv_offset`` non-zero (offsets of about a pixel)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = CAMixerOSR(**CONFIGS[config], scale=scale).state_dict()
    state = {}
    for key in sorted(shapes):
        value = torch.randn(shapes[key].shape, generator=generator)
        if value.dim() > 1:
            value = value / math.sqrt(value[0].numel())
            if key.endswith(("project_q.weight", "project_k.weight")):
                value = value / 4.0
        elif "norm" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * value
        else:
            value = (0.5 if "conv_offset" in key else 0.1) * value
        state[key] = value
    return state


def crop(data: Path, image: str, box: tuple[int, int, int, int]) -> Tensor:
    """(1, 3, h, w) in [0, 1]: ``box`` (top, left, h, w) of ``data/Set14/HR/<image>.png``."""
    top, left, h, w = box
    pixels = np.asarray(Image.open(data / "Set14" / "HR" / f"{image}.png").convert("RGB"))
    tile = pixels[top:top + h, left:left + w].astype(np.float32) / 255.0
    return torch.from_numpy(tile).permute(2, 0, 1).unsqueeze(0).contiguous()


def official_condition(height: int, width: int, rows: tuple[int, int] | None) -> Tensor:
    """OSRT's ``get_condition(H, W, 'cos_latitude')`` of the panorama, rows of the crop."""
    top, full = (0, height) if rows is None else rows
    r = 1.0 / full
    seq = -1.0 + r + (2 * r) * torch.arange(full).float()
    glob = torch.cos(seq.view(full, 1, 1).repeat(1, width, 1).permute(2, 0, 1) * math.pi / 2)
    return glob[:, top:top + height].unsqueeze(0)


def deform_conv2d(x, offset, weight, bias, padding, mask):
    """torchvision's ``deform_conv2d``, stride 1, by im2col."""
    b, c, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    gy, gx = torch.meshgrid(torch.arange(h).type_as(x), torch.arange(w).type_as(x), indexing="ij")
    columns = []
    for k in range(kh * kw):
        py = gy - padding + k // kw + offset[:, 2 * k]
        px = gx - padding + k % kw + offset[:, 2 * k + 1]
        grid = torch.stack((2.0 * px / (w - 1) - 1.0, 2.0 * py / (h - 1) - 1.0), dim=3)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)
        columns.append(sampled * mask[:, k:k + 1])
    cols = torch.stack(columns, dim=2).reshape(b, c * kh * kw, h * w)
    out = weight.reshape(out_c, -1) @ cols
    return out.view(b, out_c, h, w) + bias.view(1, -1, 1, 1)


class DCNv2Pack(nn.Module):
    """BasicSR's ``DCNv2Pack``."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__()
        self.padding = padding
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size,
                                               kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv_offset = nn.Conv2d(in_channels, 3 * kernel_size**2, kernel_size,
                                     padding=padding)

    def forward(self, x, feat):
        o1, o2, mask = torch.chunk(self.conv_offset(feat), 3, dim=1)
        return deform_conv2d(x, torch.cat((o1, o2), dim=1), self.weight, self.bias,
                             self.padding, torch.sigmoid(mask))


def basicsr_stubs():
    """The basicsr names the official file imports: flow_warp, DCNv2Pack, to_2tuple,
    trunc_normal_ and ARCH_REGISTRY."""
    registry = types.SimpleNamespace(register=lambda obj=None: (lambda cls: cls))
    util = {"flow_warp": flow_warp, "DCNv2Pack": DCNv2Pack, "to_2tuple": lambda v: (v, v),
            "trunc_normal_": lambda t, **kw: t}
    return stubbed_modules({"basicsr": {}, "basicsr.archs": {}, "basicsr.archs.arch_util": util,
                            "basicsr.utils": {},
                            "basicsr.utils.registry": {"ARCH_REGISTRY": registry}})


def load_official(path: str | os.PathLike | None = None) -> types.ModuleType:
    """The official architecture module (``path`` or ``$CAMIXER_OFFICIAL_ODISR_ARCH``)."""
    file = Path(path or os.environ.get(ENV_VAR, ""))
    if not file.is_file():
        raise FileNotFoundError(f"set {ENV_VAR} to codes/odisr/archs/CAMixerOSR_arch.py")
    spec = importlib.util.spec_from_file_location("camixerosr_official_arch", file)
    module = importlib.util.module_from_spec(spec)
    with basicsr_stubs():
        spec.loader.exec_module(module)
    return module


@contextmanager
def official_routing(gamma: float):
    if gamma not in GAMMAS:
        raise ValueError(f"the official code has no γ; {GAMMAS} are reproducible, not {gamma}")
    saved = F.gumbel_softmax

    def draw(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        if gamma == 1.0:
            return F.one_hot(torch.zeros_like(logits[..., 0]).long(), logits.shape[-1]).float()
        return torch.softmax(logits / tau, dim=dim)

    F.gumbel_softmax = draw
    try:
        yield
    finally:
        F.gumbel_softmax = saved


def run_official(module: types.ModuleType, case: str, data: Path) -> dict[str, Tensor]:
    """The official outputs of one case: {"condition", "gamma_0.5", "gamma_1.0"}."""
    config, scale, image, box, rows = CASES[case]
    net = module.CAMixerOSR(n_block=list(CONFIGS[config]["blocks_per_group"]),
                            n_group=len(CONFIGS[config]["blocks_per_group"]),
                            n_feats=CONFIGS[config]["n_feats"], scale=scale)
    checkpoint = {"params_ema": seeded_state_dict(config, scale)}
    net.load_state_dict(checkpoint["params_ema"], strict=True)      # as BasicSR's param_key_g
    net.eval()
    lr = crop(data, image, box)
    condition = official_condition(box[2], box[3], rows)
    result = {"condition": condition}
    for gamma in GAMMAS:
        with torch.no_grad(), official_routing(gamma):
            out = net(pad_to_multiple(lr, 16), pad_to_multiple(condition, 16))
        result[f"gamma_{gamma}"] = out[..., :box[2] * scale, :box[3] * scale].contiguous()
    return result


def filter2d(img, ddepth, kernel):
    """cv2.filter2D (correlation, reflect-101 border)."""
    kh, kw = kernel.shape
    padded = np.pad(img, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="reflect")
    out = np.zeros_like(img)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * padded[i:i + img.shape[0], j:j + img.shape[1]]
    return out


def gaussian_kernel(size, sigma):
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return (g / g.sum()).reshape(size, 1)


def official_metrics(arch: Path) -> dict[str, dict[str, float]]:
    """Official WS-PSNR / WS-SSIM (border 0, RGB) of every ``metric_images`` pair."""
    default = arch.parent.parent / "metrics" / "odi_metric.py"
    file = Path(os.environ.get("CAMIXER_OFFICIAL_ODISR_METRIC", default))
    registry = types.SimpleNamespace(register=lambda obj=None: (lambda f: f))
    reorder = lambda img, input_order="HWC": img[..., None] if img.ndim == 2 else img
    stubs = {"cv2": {"filter2D": filter2d, "getGaussianKernel": gaussian_kernel},
             "basicsr": {}, "basicsr.metrics": {},
             "basicsr.metrics.metric_util": {"reorder_image": reorder, "to_y_channel": None},
             "basicsr.utils": {}, "basicsr.utils.color_util": {"rgb2ycbcr_pt": None},
             "basicsr.utils.registry": {"METRIC_REGISTRY": registry}}
    with stubbed_modules(stubs):
        spec = importlib.util.spec_from_file_location("odi_metric_official", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    values = {}
    for name in METRIC_SHAPES:
        img, ref = metric_images(name)
        values[name] = {"ws_psnr": float(module.calculate_psnr_ws(img, ref, crop_border=0)),
                        "ws_ssim": float(module.calculate_ssim_ws(img, ref, crop_border=0))}
    return values


def main() -> None:
    data = Path(os.environ.get("CAMIXER_FAST_SHARED", REPO.parent / "shared")) / "data"
    module = load_official()
    fixture = {"network": {case: run_official(module, case, data) for case in CASES},
               "metrics": official_metrics(Path(os.environ[ENV_VAR]))}
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save(fixture, FIXTURE)
    print(f"{FIXTURE}: {len(CASES)} network cases, {len(METRIC_SHAPES)} metric pairs, {FIXTURE.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
