"""Bytes and FLOPs of each Triton kernel of ours per forward, and its share of the roofline
against ceilings measured on the GPU (bench/gpu_bench.py's ``ceilings`` section).

Pure Python (no torch): the GPU benchmark records the shapes, the routing (K per block) and the
kernels' measured times; :func:`forward_costs` and :func:`roofline_rows` turn them into the
table of bench/RESULTS.md's GPU section (bench/gpu_report.py).

The model of a kernel's cost (one launch, the same conventions as ``bench/gates/aot.py``):

- bytes: each tensor element the kernel must read or write, once (perfect cache reuse: a
  floor); fp32 side outputs (log-sum-exp, gradient accumulators) at 4 bytes;
- matrix FLOPs: the tile products (``tl.dot``), a multiply-add counting 2; vector FLOPs: the
  rest (softmax, bilinear taps, channel means), on the FMA units in every dtype;
- floor time: max(bytes / copy bandwidth, matrix FLOPs / matrix rate + vector FLOPs / FMA
  rate). The matrix rate is the measured cuBLAS rate of the kernel's dot precision: IEEE fp32
  products run on the FMA units (the fp32 rate with TF32 off), ``tf32`` at the TF32 rate,
  ``tf32x3`` at a third of it (three TF32 products per product), fp16 / bf16 at theirs;
- roofline share: floor time / measured time (1 = at the roofline).
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("ieee", "tf32", "tf32x3", "fp16", "bf16")
"""Dot precisions a kernel runs its products in (fp32: the first three)."""


@dataclass(frozen=True)
class Ceilings:
    """What the GPU can do, measured: copy bandwidth (bytes read + written per second) and
    dense matrix-product rates (FLOP/s) by operand precision."""

    bandwidth: float
    fp32: float          # fp32 products on the FMA units (cuBLAS with TF32 off)
    tf32: float
    fp16: float
    bf16: float

    def matrix_rate(self, precision: str) -> float:
        """FLOP/s of tile products in ``precision`` (:data:`PRECISIONS`)."""
        rates = {"ieee": self.fp32, "tf32": self.tf32, "tf32x3": self.tf32 / 3,
                 "fp16": self.fp16, "bf16": self.bf16}
        if precision not in rates:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return rates[precision]

    @classmethod
    def from_record(cls, record: dict) -> Ceilings:
        """From the benchmark's ``ceilings`` section (GB/s and TFLOP/s)."""
        rates = record["matmul_tflops"]
        return cls(record["copy_gb_s"] * 1e9, rates["fp32"] * 1e12, rates["tf32"] * 1e12,
                   rates["fp16"] * 1e12, rates["bf16"] * 1e12)


@dataclass(frozen=True)
class Cost:
    """What one or more launches of a kernel must move and compute."""

    bytes: float
    matrix_flops: float = 0.0
    vector_flops: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.matrix_flops + other.matrix_flops,
                    self.vector_flops + other.vector_flops)

    def floor_s(self, ceilings: Ceilings, precision: str) -> float:
        """Seconds at the roofline: memory or compute, whichever binds."""
        compute = (self.matrix_flops / ceilings.matrix_rate(precision)
                   + self.vector_flops / ceilings.fp32)
        return max(self.bytes / ceilings.bandwidth, compute)

    def bound(self, ceilings: Ceilings, precision: str) -> str:
        """"memory" or "compute": which term sets :meth:`floor_s`."""
        compute = (self.matrix_flops / ceilings.matrix_rate(precision)
                   + self.vector_flops / ceilings.fp32)
        return "memory" if self.bytes / ceilings.bandwidth >= compute else "compute"


@dataclass(frozen=True)
class Shape:
    """The maps a block's kernels see: B images of C channels, H × W (padded to windows)."""

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
        """Windows over the whole batch."""
        return self.pixels // self.tokens


def window_scores(s: Shape, in_channels: int | None = None) -> Cost:
    """Channel mean of the predictor's map per window (``in_channels``: c4 from the network's
    own predictor, 1 from the fused block's, which hands over the channel mean in fp32), the
    ws² → ws → 2 MLP, softmax."""
    c_in, hid = in_channels or (s.channels + 4) // 4, s.window
    size = 4 if in_channels == 1 else s.itemsize
    return Cost(c_in * s.pixels * size + s.windows * 2 * 4,
                vector_flops=c_in * s.pixels + s.windows * (2 * s.tokens * hid + 4 * hid + 8))


def select(s: Shape) -> Cost:
    """Rank every window of an image against the others (comparison counting), write K."""
    n = s.windows // s.batch
    return Cost(s.windows * 2 * 4 + s.windows * 8 + s.batch * 8,
                vector_flops=s.batch * (2 * n * n + 4 * n))


def deform_key_hard(s: Shape, hard_windows: int) -> Cost:
    """x + bilinear warp of x on the pixels of ``hard_windows`` windows (over the batch)."""
    px = hard_windows * s.tokens
    return Cost((2 * s.channels + 2) * px * s.itemsize, vector_flops=(8 * s.channels + 20) * px)


def deform_key_map(s: Shape) -> Cost:
    """The same on every pixel (training forward)."""
    return deform_key_hard(s, s.windows)


def deform_key_backward(s: Shape) -> Cost:
    """Gradients to x (fp32 accumulators, scattered into the four taps) and to the offsets:
    x, the output gradient and the offsets read, dx and d(offsets) written in fp32."""
    c, px = s.channels, s.pixels
    return Cost((2 * c + 2) * px * s.itemsize + (c + 2) * px * 4,
                vector_flops=(20 * c + 30) * px)


def hard_window_attention(s: Shape, hard_windows: int) -> Cost:
    """Hard windows: project Q (C×C), fold W_k into Q (C×C), QKᵀ and PV over the window's
    tokens, online softmax; simple windows: v·sa. Reads x, k_in, v of the hard windows, v and
    sa of the others, writes every output pixel."""
    c, t = s.channels, s.tokens
    hard_px = hard_windows * t
    simple_px = s.pixels - hard_px
    return Cost(bytes=(3 * c * hard_px + 2 * c * c + (c + 1) * simple_px + c * s.pixels)
                * s.itemsize,
                matrix_flops=hard_windows * (4 * t * c * c + 4 * t * t * c),
                vector_flops=hard_windows * 6 * t * t + c * simple_px)


def attention_forward(s: Shape) -> Cost:
    """Training: softmax(QKᵀ)V in every window, Q, K, V projected; out and the fp32 lse."""
    c, t = s.channels, s.tokens
    return Cost(4 * c * s.pixels * s.itemsize + s.pixels * 4,
                matrix_flops=s.windows * 4 * t * t * c, vector_flops=s.windows * 6 * t * t)


def attention_backward_dkv(s: Shape) -> Cost:
    """dK, dV: Q, K, V, dO, lse, Δ read; dK, dV written; QKᵀ, PᵀdO, dOVᵀ, dSᵀQ."""
    c, t = s.channels, s.tokens
    return Cost(6 * c * s.pixels * s.itemsize + 2 * s.pixels * 4,
                matrix_flops=s.windows * 8 * t * t * c, vector_flops=s.windows * 8 * t * t)


def attention_backward_dq(s: Shape) -> Cost:
    """dQ: Q, K, V, dO, lse, Δ read; dQ written; QKᵀ, dOVᵀ, dS·K."""
    c, t = s.channels, s.tokens
    return Cost(5 * c * s.pixels * s.itemsize + 2 * s.pixels * 4,
                matrix_flops=s.windows * 6 * t * t * c, vector_flops=s.windows * 8 * t * t)


def predictor(s: Shape) -> Cost:
    """The fused block's predictor per pixel (kernels/predictor.py): v = project_v(x), h =
    in_conv([v | Cg | Cw]), LayerNorm, LeakyReLU, the offsets' two 1×1 convolutions, h's
    channel mean and partial sums. Reads x and the conditions; writes v, h, the offsets, the
    mean (fp32). bench/block_cost.py's per-block table uses these functions too."""
    c, c4, c8, px, b = s.channels, (s.channels + 4) // 4, (s.channels + 4) // 8, s.pixels, \
        s.itemsize
    return Cost(px * ((c + 4) * b + (c + c4 + 2) * b + 4),
                matrix_flops=px * 2 * (c * c + c * c4 + c4 * c8),
                vector_flops=px * (2 * 4 * c4 + 10 * c4 + 4 * c8 + 40))


def predictor_heads(s: Shape) -> Cost:
    """sa (3×3 convolution of h, sigmoid) and ca (from the partial sums)."""
    c4 = (s.channels + 4) // 4
    return Cost(s.pixels * (c4 * s.itemsize + s.itemsize),
                vector_flops=s.pixels * (2 * 9 * c4 + 10))


def depthwise3x3(s: Shape) -> Cost:
    """The mixer's depthwise 3×3 on the attention output (NHWC in, NHWC out)."""
    c = s.channels
    return Cost(2 * s.pixels * c * s.itemsize, vector_flops=s.pixels * 2 * 9 * c)


def mixer_tail(s: Shape) -> Cost:
    """Dilated 3×3, gelu·ca + attn, project_out, + x, LN1, the FFN's project_in (C → 2C):
    reads the dw output, attn and x, writes x1 and u (2C)."""
    c = s.channels
    return Cost(s.pixels * 6 * c * s.itemsize, matrix_flops=s.pixels * 2 * 3 * c * c,
                vector_flops=s.pixels * (2 * 9 * c + 30 * c))


def ffn_tail(s: Shape) -> Cost:
    """The FFN's depthwise 3×3 on u (2C), gelu gate, project_out, + x1, LN2."""
    c = s.channels
    return Cost(s.pixels * 4 * c * s.itemsize, matrix_flops=s.pixels * 2 * c * c,
                vector_flops=s.pixels * (2 * 2 * 9 * c + 30 * c))


def _times(cost: Cost, n: int) -> Cost:
    return Cost(cost.bytes * n, cost.matrix_flops * n, cost.vector_flops * n)


def inference_costs(s: Shape, hard_per_block: list[int], *,
                    fused_block: bool = True) -> dict[str, Cost]:
    """Costs per forward of the inference kernels, by profiler kernel name, summed over the
    blocks; ``hard_per_block``: K summed over the batch, one entry per block. ``fused_block``:
    the Triton backend's block path (kernels/block.py), one launch of each of its kernels a
    block; else only the hot operations run as kernels."""
    blocks = len(hard_per_block)
    zero = Cost(0.0)
    out = {"_deform_key_fwd_kernel": zero, "_hard_window_attention_kernel": zero}
    for k in hard_per_block:
        out["_deform_key_fwd_kernel"] += deform_key_hard(s, k)
        out["_hard_window_attention_kernel"] += hard_window_attention(s, k)
    out["_window_scores_kernel"] = _times(window_scores(s, 1 if fused_block else None), blocks)
    out["_select_kernel"] = _times(select(s), blocks)
    if fused_block:
        for name, cost in (("_predictor_kernel", predictor(s)),
                           ("_predictor_heads_kernel", predictor_heads(s)),
                           ("_depthwise3x3_kernel", depthwise3x3(s)),
                           ("_mixer_tail_kernel", mixer_tail(s)),
                           ("_ffn_tail_kernel", ffn_tail(s))):
            out[name] = _times(cost, blocks)
    return out


def training_costs(s: Shape, blocks: int) -> dict[str, Cost]:
    """Costs of one training step (forward and backward) of the Triton training kernels, by
    profiler kernel name, summed over ``blocks`` blocks."""
    per_block = {"_deform_key_fwd_kernel": deform_key_map(s),
                 "_deform_key_bwd_kernel": deform_key_backward(s),
                 "_attention_fwd_kernel": attention_forward(s),
                 "_attention_bwd_dkv_kernel": attention_backward_dkv(s),
                 "_attention_bwd_dq_kernel": attention_backward_dq(s)}
    return {name: Cost(c.bytes * blocks, c.matrix_flops * blocks, c.vector_flops * blocks)
            for name, c in per_block.items()}


def roofline_rows(times_us: dict[str, float], costs: dict[str, Cost], ceilings: Ceilings,
                  precision: str) -> list[dict]:
    """One row per kernel of ``costs`` that ran (a measured time): its time, floor, share of
    the roofline and what binds it. Kernels measured without a cost model are listed with
    ``share`` None; kernels of the model that did not run are left out."""
    rows = []
    for name in sorted(set(times_us) | set(costs)):
        if name not in times_us:
            continue
        us = times_us[name]
        cost = costs.get(name)
        if cost is None:
            rows.append({"kernel": name, "us": us, "floor_us": None, "share": None,
                         "bound": None})
            continue
        floor = cost.floor_s(ceilings, precision) * 1e6
        rows.append({"kernel": name, "us": us, "floor_us": floor,
                     "share": floor / us if us > 0 else None,
                     "bound": cost.bound(ceilings, precision),
                     "mb": cost.bytes / 1e6,
                     "gflop": (cost.matrix_flops + cost.vector_flops) / 1e9})
    return rows
