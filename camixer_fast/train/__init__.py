"""Training and fine-tuning CAMixerSR and CAMixerOSR (spec §4) on the network that serves
inference, from one CPU to many GPUs: :mod:`.data` (HR crops, LR by MATLAB bicubic,
augmentations keyed on (seed, epoch, index), CAMixerOSR crops with their rows' latitude
condition), :mod:`.objective` (L1 or WS-L1 + the ratio loss on the global batch's mask mean),
:mod:`.trainer` and :mod:`.checkpoints` (AdamW, MultiStep, EMA, validation, official-format
checkpoints, exact resume), :mod:`.distributed` (torchrun, DDP). A multi-process run equals a
single-process one on the same global batch (up to the per-rank Gumbel noise).
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
from camixer_fast.train.objective import (
    LOSSES,
    LossTerms,
    pixel_loss,
    ratio_weight,
    training_loss,
)
from camixer_fast.train.trainer import (
    AMP_MODES,
    ARCH_DEFAULTS,
    ARCHS,
    CONTINUITY_KEYS,
    TRAIN_BACKENDS,
    ConfigError,
    TrainConfig,
    Trainer,
    train,
    training_backend,
)


def erp_row_weights(rows: np.ndarray, height: int) -> np.ndarray:
    """Deprecated: ``camixer_fast.evaluation.metrics.erp_row_weights(height, rows)``, float32."""
    warnings.warn("camixer_fast.train.erp_row_weights(rows, height) is deprecated; use "
                  "camixer_fast.evaluation.metrics.erp_row_weights(height, rows)", DeprecationWarning,
                  stacklevel=2)
    return metrics.erp_row_weights(height, rows).astype(np.float32)


__all__ = [
    "AMP_MODES",
    "ARCHS",
    "ARCH_DEFAULTS",
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
    "ratio_weight",
    "read_checkpoint",
    "save_checkpoint",
    "setup_distributed",
    "train",
    "training_backend",
    "training_loss",
    "unwrap",
]
