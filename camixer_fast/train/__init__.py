"""Training and fine-tuning CAMixerSR (spec §4) on the network that serves inference.

One code path from a laptop CPU to many GPUs:

- **data** (:mod:`.data`, :class:`PairedPatches`): HR images from a folder, LR made on the fly
  with the MATLAB-compatible bicubic of :mod:`camixer_fast.evaluation.imresize` (from a neighbourhood of
  the crop only, bit-identical to cropping the LR of the whole image) or read from an LR folder;
  random LR crops (64×64 by default) with the HR crop under them, flips and 90° rotations. Every
  crop and augmentation is a pure function of (seed, epoch, sample index), so a sample is the
  same whichever process draws it and whenever it is drawn.
- **objective** (:mod:`.objective`, :func:`training_loss`): L1 (or, for 360° equirectangular
  images, the latitude-weighted L1) + the ratio loss 2γ·(m − 0.5)², m the mean training mask
  over all blocks, windows and images of the *global* batch.
- **optimisation** (:mod:`.trainer`, :mod:`.checkpoints`): AdamW, a MultiStep schedule and an
  EMA of the weights, with the official defaults (:class:`TrainConfig`); periodic validation
  (Y-PSNR of the EMA weights on a held folder) and atomic checkpoints in the official format
  (``params``, ``params_ema``) plus the training state under extra keys, so that
  :func:`camixer_fast.load_model` and the official tooling read them and ``resume`` continues
  exactly where an uninterrupted run would be.
- **scale-out** (:mod:`.distributed`): under ``torchrun`` (``WORLD_SIZE`` > 1) the model is
  wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs) and every rank takes its share
  of each global batch through a ``DistributedSampler``; only rank 0 writes checkpoints and logs.
- **mixed precision** (``TrainConfig.amp = "bf16"``): bf16 autocast around the forward and the
  loss, fp32 master weights, on either backend (the Triton kernels' entries cast their inputs
  to one dtype under autocast, :mod:`camixer_fast.kernels._autocast`).

Multi-process runs equal single-process runs on the same global batch by design: the global
batch at step t is the same set of samples (a DistributedSampler with ``drop_last=True`` over
the same permutation, the local batches never straddle epochs), every sample's crop is keyed on
its index, the pixel loss is a mean over equally sized shards (so DDP's gradient average is the
mean over the global batch), and the ratio loss -- the square of a mean over the batch, which
averaging per-rank squares would get wrong -- is computed from the all-reduced m with a
gradient of 4γ(m − 0.5)·∇m_rank on each rank, whose DDP average is exactly 4γ(m − 0.5)·∇m.
Only the Gumbel noise of the training mask differs (it is drawn per rank); with
``train_noise=False`` the two runs agree to float rounding.
"""

from __future__ import annotations

import warnings

import numpy as np

from camixer_fast.evaluation import metrics
from camixer_fast.train.checkpoints import CHECKPOINT_FORMAT, EMA, read_checkpoint, save_checkpoint
from camixer_fast.train.data import (
    AUGMENTS,
    DataError,
    PairedPatches,
    SampleStream,
    augment_array,
    bicubic_lr_crop,
    derive_seed,
    load_validation_pairs,
)
from camixer_fast.train.distributed import Rank, setup_distributed, unwrap
from camixer_fast.train.objective import LOSSES, LossTerms, pixel_loss, training_loss
from camixer_fast.train.trainer import (
    AMP_MODES,
    CONTINUITY_KEYS,
    TRAIN_BACKENDS,
    ConfigError,
    TrainConfig,
    Trainer,
    train,
    training_backend,
)


def erp_row_weights(rows: np.ndarray, height: int) -> np.ndarray:
    """Deprecated: ``camixer_fast.evaluation.metrics.erp_row_weights(height, rows)`` in float32.

    The WS weights cos((p + 0.5 − H/2)·π/H) of rows ``rows`` of an equirectangular image of
    height ``height``; same shape as ``rows``, float32 (the values the WS-L1 training loss uses).
    """
    warnings.warn("camixer_fast.train.erp_row_weights(rows, height) is deprecated; use "
                  "camixer_fast.evaluation.metrics.erp_row_weights(height, rows)", DeprecationWarning,
                  stacklevel=2)
    return metrics.erp_row_weights(height, rows).astype(np.float32)


__all__ = [
    "AMP_MODES",
    "AUGMENTS",
    "CHECKPOINT_FORMAT",
    "CONTINUITY_KEYS",
    "EMA",
    "LOSSES",
    "TRAIN_BACKENDS",
    "ConfigError",
    "DataError",
    "LossTerms",
    "PairedPatches",
    "Rank",
    "SampleStream",
    "TrainConfig",
    "Trainer",
    "augment_array",
    "bicubic_lr_crop",
    "derive_seed",
    "erp_row_weights",
    "load_validation_pairs",
    "pixel_loss",
    "read_checkpoint",
    "save_checkpoint",
    "setup_distributed",
    "train",
    "training_backend",
    "training_loss",
    "unwrap",
]
