"""Cost accounting: parameter counts, the paper's FLOPs convention, measured multiply-adds.

Two different numbers, not to be confused:

- :func:`paper_flops` is the convention behind the paper's Table 2 #FLOPs (spec §7): the
  official code's ``flops()`` formula, which counts 2 FLOPs per multiply-add for most layers,
  estimates a few predictor layers roughly and counts the attention windows from γ alone
  (not from the routing of an actual image).
- :func:`count_madds` measures multiply-adds (1 per multiply-accumulate) of an actual forward
  pass: every convolution and linear layer as run, and the attention work of the windows the
  routing chose for that input. Table 3's #MAdds (77.9G for the B model on a 320×180 input at
  γ = 1) is this kind of count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from camixer_fast.reference.model import CAMixerSR, Predictor
from camixer_fast.reference.routing import Routing

MODEL_SIZES: dict[str, int] = {"S": 36, "M": 48, "B": 60}
"""Feature channels C of the published model sizes (spec §6)."""


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _mixer_paper_flops(n_feats: int, gamma: float, height: int, width: int,
                       window_size: int) -> float:
    """One CAMixer's FLOPs on an (height, width) feature map, as the official code counts them."""
    c, ws, hw = n_feats, window_size, height * width
    cdim = c + 4
    windows = math.ceil(height / ws) * math.ceil(width / ws)
    flops = 0.0
    # predictor: in_conv 1×1 (C+4)→(C+4)/4, as 2·HW·(C+4)·(C+4)/4
    flops += hw * cdim * cdim // 4 * 2
    # predictor heads, estimated: (C+4)/4 channels to 2 + 1 outputs (offsets, spatial attention)
    flops += hw * cdim // 4 * (2 + 1) * 2
    # predictor: a further 2·HW·(C+4)/4·2 (the official estimate of the remaining heads)
    flops += hw * cdim // 4 * 2 * 2
    # window scores: Linear ws²→ws and ws→2 per window (the second counted as ws·2·ws)
    flops += windows * ws**2 * ws * 2
    flops += windows * ws * 2 * ws * 2
    # project_v 1×1 C→C
    flops += hw * c * c * 2
    # project_q and project_k (C→C per token) on the fraction γ of the pixels
    flops += 2 * hw * c * c * 2 * gamma
    # attention: int(Np·γ/ws²) windows on the padded size, 2·(ws²)²·C each (Q·Kᵀ and A·V,
    # one FLOP per multiply-add here)
    padded = ws * math.ceil(height / ws) * ws * math.ceil(width / ws)
    hard_windows = int(padded * gamma / ws / ws)
    flops += hard_windows * 2 * (ws * ws) ** 2 * c
    # conv_sptial: two depthwise 3×3 convs
    flops += 2 * hw * c * 9 * 2
    # project_out 1×1 C→C
    flops += hw * c * c * 2
    return flops


def paper_flops(n_feats: int, scale: int, gamma: float, lr_hw: tuple[int, int] = (32, 32),
                blocks: tuple[int, ...] = (4, 4, 6, 6), window_size: int = 16) -> int:
    """FLOPs of one LR input of size ``lr_hw`` in the paper's convention (the official formula).

    Terms, with C = ``n_feats``, HW = the LR pixel count (not padded), s = ``scale``:

    - head 3×3 conv 3→C: 2·HW·3·C·9;
    - global predictor, counted as 2·HW·8·(C+2)·9;
    - per block: the CAMixer (:func:`_mixer_paper_flops`: predictor estimates, window scores,
      project_v, project_q/k on a fraction γ, int(Np·γ/ws²) attention windows of 2·(ws²)²·C,
      the two depthwise convs, project_out) and the gated FFN (2·HW·2C·C + 2·HW·2C·9 +
      2·HW·C·C);
    - per group: the 1×1 C→C tail, 2·HW·C²;
    - body tail 3×3 C→C: 2·HW·C²·9; tail 3×3 C→3s²: 2·HW·C·3s²·9.

    For 32×32 this gives S (C=36) 895M / 653M / 533M / 412M at γ = 1 / 0.5 / 0.25 / 0,
    M (C=48) 1.38G / 1.03G / 861M / 688M, B (C=60) 1.96G / 1.50G / 1.26G / 1.03G; the paper's
    Table 2 prints 894M / 652M / 532M / 410M, 1.37G / 1.03G / 858M / 686M and
    1.96G / 1.49G / 1.26G / 1.03G (all within 0.7%). No formula in which γ enters linearly
    (this one, or any that counts int(4γ) hard windows of a 32×32 input) can give all twelve:
    it makes the γ = 0.25 figure the mean of the γ = 0 and γ = 0.5 ones, while the paper's
    S figures have 532 > (410 + 652) / 2 + 0.5.
    """
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


def measure_madds(model: CAMixerSR, x: Tensor) -> tuple[dict[str, int], Routing]:
    """Multiply-adds of ``model(x)`` at inference, by kind, and the routing of that forward.

    x: (B, 3, H, W) input. Runs one forward in eval mode under ``torch.inference_mode`` on the
    model's own backend (the training flag is restored afterwards) and returns
    ``({"conv", "linear", "window_scores", "qk_projection", "attention", "total"}, routing)``:

    - conv: every ``nn.Conv2d`` of the network as it runs (1×1 ones as linear maps, depthwise
      and dilated included), on the padded size (``out_CA`` on the pooled 1×1 map): output
      elements × inputs per output;
    - linear: ``nn.Linear`` layers applied as modules (none: ``project_q``/``project_k`` and
      ``out_mask`` are counted below);
    - window_scores: the ``out_mask`` MLP, ws²·ws + ws·2 per window of the padded image, every
      window;
    - qk_projection: ``project_q`` and ``project_k`` on the tokens of the hard windows only,
      2·K·ws²·C² per image and block;
    - attention: Q·Kᵀ and A·V of each hard window, 2·(ws²)²·C, for the K windows the routing
      chose (from the forward's :class:`~camixer_fast.reference.routing.Routing`).

    Softmax, normalisation, activations, the bilinear warp and elementwise products are not
    counted. The counts follow from the layer shapes and the routing alone, so they are the
    same on every backend.
    """
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            _, routing = model(x, return_routing=True)
    finally:
        model.train(was_training)
    ws = model.window_size
    batch, height, width = x.shape[0], -(-x.shape[-2] // ws) * ws, -(-x.shape[-1] // ws) * ws
    pooled = {id(m.out_CA[1]) for m in model.modules() if isinstance(m, Predictor)}
    counts = {"conv": 0, "linear": 0, "window_scores": 0, "qk_projection": 0, "attention": 0}
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            pixels = 1 if id(module) in pooled else height * width
            kh, kw = module.kernel_size
            counts["conv"] += (batch * pixels * module.out_channels
                               * (module.in_channels // module.groups) * kh * kw)
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


def madds_breakdown(model: CAMixerSR, x: Tensor) -> dict[str, int]:
    """Multiply-adds of ``model(x)`` at inference, by kind (see :func:`measure_madds`)."""
    return measure_madds(model, x)[0]


def count_madds(model: CAMixerSR, x: Tensor) -> int:
    """Measured multiply-adds of one inference forward ``model(x)``, x (B, 3, H, W).

    The sum of :func:`measure_madds`: convs, linears, window scores, and the Q/K projections
    and attention matmuls of the windows the routing actually chose.
    """
    return madds_breakdown(model, x)["total"]
