"""Cost accounting: parameters, the paper's FLOPs (:func:`paper_flops`, the official
``flops()`` formula of Table 2), measured multiply-adds of a forward (:func:`count_madds`, Table
3's #MAdds), and each GPU kernel's bytes and FLOPs per launch (:class:`Cost`, the roofline)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camixer_fast.reference import odisr
from camixer_fast.reference.model import CAMixerSR, Predictor
from camixer_fast.reference.routing import Routing

MODEL_SIZES: dict[str, int] = {"S": 36, "M": 48, "B": 60}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mixer_paper_flops(n_feats: int, gamma: float, height: int, width: int,
                       window_size: int) -> float:
    """One CAMixer's FLOPs on a (height, width) map, as the official code counts them."""
    c, ws, hw = n_feats, window_size, height * width
    cdim = c + 4
    windows = math.ceil(height / ws) * math.ceil(width / ws)
    flops = 0.0
    flops += hw * cdim * cdim // 4 * 2
    flops += hw * cdim // 4 * (2 + 1) * 2
    flops += hw * cdim // 4 * 2 * 2
    # window scores: Linear ws²→ws and ws→2 per window (the second counted as ws·2·ws)
    flops += windows * ws**2 * ws * 2
    flops += windows * ws * 2 * ws * 2
    flops += hw * c * c * 2
    flops += 2 * hw * c * c * 2 * gamma
    padded = ws * math.ceil(height / ws) * ws * math.ceil(width / ws)
    hard_windows = int(padded * gamma / ws / ws)
    flops += hard_windows * 2 * (ws * ws) ** 2 * c
    flops += 2 * hw * c * 9 * 2
    flops += hw * c * c * 2
    return flops


def paper_flops(n_feats: int, scale: int, gamma: float, lr_hw: tuple[int, int] = (32, 32),
                blocks: tuple[int, ...] = (4, 4, 6, 6), window_size: int = 16) -> int:
    """FLOPs of one LR input of ``lr_hw`` in the paper's convention (official formula;
    S at 32×32: 895M / 653M / 533M / 412M at γ = 1 / 0.5 / 0.25 / 0, Table 2 within 0.7%)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    height, width = lr_hw
    hw, c = height * width, n_feats
    total = 0.0
    total += hw * 3 * c * 9 * 2
    total += hw * 8 * (c + 2) * 9 * 2
    ffn = hw * c * 2 * c * 2 + hw * 2 * c * 9 * 2 + hw * c * c * 2
    mixer = _mixer_paper_flops(c, gamma, height, width, window_size)
    total += sum(blocks) * (mixer + ffn)
    total += len(blocks) * hw * c * c * 2
    total += hw * c * c * 9 * 2
    total += hw * c * scale**2 * 3 * 9 * 2
    return round(total)


def measure_madds(model: CAMixerSR | odisr.CAMixerOSR,
                  x: Tensor) -> tuple[dict[str, int], Routing]:
    """Multiply-adds of one inference forward ``model(x)``, x (B, 3, H, W), by kind
    ({"conv", "linear", "window_scores", "qk_projection", "attention", "dcn", "total"}: layers
    as run on the padded size, Q/K projections and attention of the windows the routing chose,
    CAMixerOSR's DCNv2 products, x a whole panorama), and that forward's routing. The same on
    every backend."""
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            _, routing = model(x, return_routing=True)
    finally:
        model.train(was_training)
    ws = model.window_size
    batch, height, width = x.shape[0], -(-x.shape[-2] // ws) * ws, -(-x.shape[-1] // ws) * ws
    pooled = {id(m.out_CA[1]) for m in model.modules()
              if isinstance(m, (Predictor, odisr.Predictor))}
    counts = {"conv": 0, "linear": 0, "window_scores": 0, "qk_projection": 0, "attention": 0,
              "dcn": 0}
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            pixels = 1 if id(module) in pooled else height * width
            kh, kw = module.kernel_size
            counts["conv"] += (batch * pixels * module.out_channels
                               * (module.in_channels // module.groups) * kh * kw)
        elif isinstance(module, odisr.DCNv2Pack):
            counts["dcn"] += batch * height * width * module.weight.numel()
    tokens = ws * ws
    windows = routing.num_windows
    for mixer, record in zip(model.mixers(), routing.blocks, strict=True):
        mlp = mixer.route.out_mask
        counts["window_scores"] += batch * windows * (mlp[0].weight.numel()
                                                      + mlp[2].weight.numel())
        hard = int(record.num_hard.sum())
        proj = mixer.project_q.weight.numel() + mixer.project_k.weight.numel()
        counts["qk_projection"] += hard * tokens * proj
        counts["attention"] += hard * 2 * tokens * tokens * model.n_feats
    counts["total"] = sum(counts.values())
    return counts, routing


def madds_breakdown(model: CAMixerSR | odisr.CAMixerOSR, x: Tensor) -> dict[str, int]:
    """Multiply-adds of ``model(x)`` by kind (:func:`measure_madds`)."""
    return measure_madds(model, x)[0]


def count_madds(model: CAMixerSR | odisr.CAMixerOSR, x: Tensor) -> int:
    """Total measured multiply-adds of one inference forward (:func:`measure_madds`)."""
    return madds_breakdown(model, x)["total"]


@dataclass(frozen=True)
class Ceilings:
    """A card's copy bandwidth (bytes/s) and matrix-product rates (FLOP/s), as measured."""

    bandwidth: float
    fp32: float
    tf32: float
    fp16: float
    bf16: float

    def matrix_rate(self, precision: str) -> float:
        rates = {"ieee": self.fp32, "tf32": self.tf32, "tf32x3": self.tf32 / 3,
                 "fp16": self.fp16, "bf16": self.bf16}
        if precision not in rates:
            raise ValueError(f"precision must be one of {tuple(rates)}, got {precision!r}")
        return rates[precision]


@dataclass(frozen=True)
class Cost:
    """Bytes each element read or written once (a floor), tile-product and other FLOPs
    (a multiply-add counts 2) of one or more kernel launches."""

    bytes: float
    matrix_flops: float = 0.0
    vector_flops: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.matrix_flops + other.matrix_flops,
                    self.vector_flops + other.vector_flops)

    def __mul__(self, n: int) -> Cost:
        return Cost(self.bytes * n, self.matrix_flops * n, self.vector_flops * n)

    def _compute_s(self, ceilings: Ceilings, precision: str) -> float:
        return self.matrix_flops / ceilings.matrix_rate(precision) + self.vector_flops / ceilings.fp32

    def floor_s(self, ceilings: Ceilings, precision: str) -> float:
        """Seconds at the roofline: memory or compute, whichever binds."""
        return max(self.bytes / ceilings.bandwidth, self._compute_s(ceilings, precision))

    def bound(self, ceilings: Ceilings, precision: str) -> str:
        return "memory" if self.bytes / ceilings.bandwidth >= self._compute_s(ceilings, precision) \
            else "compute"


@dataclass(frozen=True)
class Shape:
    """The maps a block's kernels see: B images of C channels, H × W padded to windows."""

    batch: int
    channels: int
    height: int
    width: int
    window: int = 16
    itemsize: int = 4

    @property
    def pixels(self) -> int:
        return self.batch * self.height * self.width

    @property
    def tokens(self) -> int:
        return self.window * self.window

    @property
    def windows(self) -> int:
        return self.pixels // self.tokens


def window_scores(s: Shape, in_channels: int | None = None) -> Cost:
    c_in, hid = in_channels or (s.channels + 4) // 4, s.window
    size = 4 if in_channels == 1 else s.itemsize
    return Cost(c_in * s.pixels * size + s.windows * 2 * 4,
                vector_flops=c_in * s.pixels + s.windows * (2 * s.tokens * hid + 4 * hid + 8))


def select(s: Shape) -> Cost:
    n = s.windows // s.batch
    return Cost(s.windows * 2 * 4 + s.windows * 8 + s.batch * 8,
                vector_flops=s.batch * (2 * n * n + 4 * n))


def deform_key_hard(s: Shape, hard_windows: int) -> Cost:
    px = hard_windows * s.tokens
    return Cost((2 * s.channels + 2) * px * s.itemsize, vector_flops=(8 * s.channels + 20) * px)


def deform_key_backward(s: Shape) -> Cost:
    c, px = s.channels, s.pixels
    return Cost((2 * c + 2) * px * s.itemsize + (c + 2) * px * 4, vector_flops=(20 * c + 30) * px)


def hard_window_attention(s: Shape, hard_windows: int) -> Cost:
    """Hard windows: Q projection, W_k folded into Q, QKᵀ and PV; simple windows: v·sa."""
    c, t = s.channels, s.tokens
    hard_px = hard_windows * t
    simple_px = s.pixels - hard_px
    return Cost((3 * c * hard_px + 2 * c * c + (c + 1) * simple_px + c * s.pixels) * s.itemsize,
                matrix_flops=hard_windows * (4 * t * c * c + 4 * t * t * c),
                vector_flops=hard_windows * 6 * t * t + c * simple_px)


def attention_forward(s: Shape) -> Cost:
    c, t = s.channels, s.tokens
    return Cost(4 * c * s.pixels * s.itemsize + s.pixels * 4,
                matrix_flops=s.windows * 4 * t * t * c, vector_flops=s.windows * 6 * t * t)


def attention_backward_dkv(s: Shape) -> Cost:
    c, t = s.channels, s.tokens
    return Cost(6 * c * s.pixels * s.itemsize + 2 * s.pixels * 4,
                matrix_flops=s.windows * 8 * t * t * c, vector_flops=s.windows * 8 * t * t)


def attention_backward_dq(s: Shape) -> Cost:
    c, t = s.channels, s.tokens
    return Cost(5 * c * s.pixels * s.itemsize + 2 * s.pixels * 4,
                matrix_flops=s.windows * 6 * t * t * c, vector_flops=s.windows * 8 * t * t)


def predictor(s: Shape) -> Cost:
    c, c4, c8, px, b = s.channels, (s.channels + 4) // 4, (s.channels + 4) // 8, s.pixels, s.itemsize
    return Cost(px * ((c + 4) * b + (c + c4 + 2) * b + 4),
                matrix_flops=px * 2 * (c * c + c * c4 + c4 * c8),
                vector_flops=px * (2 * 4 * c4 + 10 * c4 + 4 * c8 + 40))


def predictor_heads(s: Shape) -> Cost:
    c4 = (s.channels + 4) // 4
    return Cost(s.pixels * (c4 * s.itemsize + s.itemsize), vector_flops=s.pixels * (2 * 9 * c4 + 10))


def depthwise3x3(s: Shape) -> Cost:
    return Cost(2 * s.pixels * s.channels * s.itemsize, vector_flops=s.pixels * 2 * 9 * s.channels)


def mixer_tail(s: Shape) -> Cost:
    c = s.channels
    return Cost(s.pixels * 6 * c * s.itemsize, matrix_flops=s.pixels * 2 * 3 * c * c,
                vector_flops=s.pixels * (2 * 9 * c + 30 * c))


def ffn_tail(s: Shape) -> Cost:
    c = s.channels
    return Cost(s.pixels * 4 * c * s.itemsize, matrix_flops=s.pixels * 2 * c * c,
                vector_flops=s.pixels * (2 * 2 * 9 * c + 30 * c))


def inference_costs(s: Shape, hard_per_block: list[int], *, fused_block: bool = True) -> dict[str, Cost]:
    """Per forward, by kernel (profiler name without ``_``/``_kernel``), summed over blocks;
    ``hard_per_block``: K summed over the batch per block."""
    blocks = len(hard_per_block)
    out = {"deform_key_fwd": sum((deform_key_hard(s, k) for k in hard_per_block), Cost(0.0)),
           "hard_window_attention": sum((hard_window_attention(s, k) for k in hard_per_block),
                                        Cost(0.0)),
           "window_scores": window_scores(s, 1 if fused_block else None) * blocks,
           "select": select(s) * blocks}
    if fused_block:
        out.update(predictor=predictor(s) * blocks, predictor_heads=predictor_heads(s) * blocks,
                   depthwise3x3=depthwise3x3(s) * blocks, mixer_tail=mixer_tail(s) * blocks,
                   ffn_tail=ffn_tail(s) * blocks)
    return out


def training_costs(s: Shape, blocks: int) -> dict[str, Cost]:
    """One training step's Triton kernels (forward and backward), summed over ``blocks``."""
    return {"deform_key_fwd": deform_key_hard(s, s.windows) * blocks,
            "deform_key_bwd": deform_key_backward(s) * blocks,
            "attention_fwd": attention_forward(s) * blocks,
            "attention_bwd_dkv": attention_backward_dkv(s) * blocks,
            "attention_bwd_dq": attention_backward_dq(s) * blocks}
