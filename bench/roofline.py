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


def window_scores(s: Shape) -> Cost:
    """Channel mean of the predictor's c4 map per window, the ws² → ws → 2 MLP, softmax."""
    c4, hid = (s.channels + 4) // 4, s.window
    return Cost(c4 * s.pixels * s.itemsize + s.windows * 2 * 4,
                vector_flops=c4 * s.pixels + s.windows * (2 * s.tokens * hid + 4 * hid + 8))


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


def inference_costs(s: Shape, hard_per_block: list[int]) -> dict[str, Cost]:
    """Costs per forward of the inference kernels, by profiler kernel name, summed over the
    blocks; ``hard_per_block``: K summed over the batch, one entry per block."""
    blocks = len(hard_per_block)
    zero = Cost(0.0)
    out = {"_window_scores_kernel": zero, "_select_kernel": zero,
           "_deform_key_fwd_kernel": zero, "_hard_window_attention_kernel": zero}
    for k in hard_per_block:
        out["_deform_key_fwd_kernel"] += deform_key_hard(s, k)
        out["_hard_window_attention_kernel"] += hard_window_attention(s, k)
    for name, cost in ((("_window_scores_kernel", window_scores(s)),
                        ("_select_kernel", select(s)))):
        out[name] = Cost(cost.bytes * blocks, cost.matrix_flops * blocks,
                         cost.vector_flops * blocks)
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
