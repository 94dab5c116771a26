"""``camixer-fast train --hr-dir DIR --out DIR``: train or fine-tune CAMixerSR, or CAMixerOSR
(``--arch odisr``, or --init/--resume weights of one) on 360° panoramas.

Runs alone or under ``torchrun`` (one process per GPU, or several CPU processes on gloo).
Exit status: 0 trained, 1 unusable data or weights (reported before any training step) or a
failure during training, 2 bad arguments (an --out that cannot be written included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from camixer_fast.cli import check_writable, gamma_type
from camixer_fast.models.loading import CheckpointError
from camixer_fast.train import (
    AMP_MODES,
    ARCH_DEFAULTS,
    ARCHS,
    AUGMENTS,
    LOSSES,
    TRAIN_BACKENDS,
    ConfigError,
    DataError,
    TrainConfig,
    train,
)

PROG = "camixer-fast train"


def _int_at_least(minimum: int):
    """argparse ``type``: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return parse


_positive = _int_at_least(1)
_count = _int_at_least(0)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    d = TrainConfig(hr_dir="", out_dir="")
    parser = subparsers.add_parser(
        "train", help="train or fine-tune a model (one process or torchrun)",
        description="Train CAMixerSR on random crops of HR images (LR made by MATLAB-compatible "
                    "bicubic downscaling, or read from --lr-dir) with the official objective "
                    "(L1 + ratio loss), AdamW, a MultiStep schedule and an EMA of the weights; "
                    "the defaults are the official recipe. Writes OUT/last.pth (and best.pth), "
                    "official-format checkpoints that `camixer-fast eval --weights` and "
                    "load_model read, and OUT/log.jsonl. Under torchrun it trains with "
                    "DistributedDataParallel (NCCL on GPUs, gloo on CPUs); --batch-size is "
                    "the global batch. --arch odisr trains CAMixerOSR on HR equirectangular "
                    "panoramas: each crop carries the cos-latitude of its rows in the whole "
                    "panorama, and the ratio loss is the official ODI-SR (m - 0.5)^2.",
        epilog="Exit status: 0 trained, 1 unusable data or weights, or a failure during "
               "training, 2 bad arguments.")
    data = parser.add_argument_group("data")
    data.add_argument("--hr-dir", required=True, metavar="DIR", help="folder of HR images")
    data.add_argument("--lr-dir", default=None, metavar="DIR",
                      help="LR images (<name>x<scale>.png or <name>.png) instead of bicubic LR")
    data.add_argument("--val-dir", default=None, metavar="DIR",
                      help="HR images to validate on (Y-PSNR of the EMA weights; odisr: "
                           "WS-PSNR of whole panoramas)")
    data.add_argument("--val-lr-dir", default=None, metavar="DIR",
                      help="LR images of --val-dir instead of bicubic LR")
    data.add_argument("--patch-size", type=_positive, default=d.patch_size, metavar="P",
                      help=f"LR crop side (default {d.patch_size})")
    data.add_argument("--augment", choices=AUGMENTS, default=None,
                      help="flips and 90° rotations, horizontal flips only (advisable for "
                           "360° images) or none (default flip-rot; odisr: hflip, the official, "
                           "and flip-rot is refused)")
    data.add_argument("--repeat", type=_positive, default=None, metavar="N",
                      help="visits of each image per epoch (default: >= 100 batches an epoch)")
    data.add_argument("--workers", type=_count, default=d.workers, metavar="N",
                      help="DataLoader worker processes per rank (default 0)")
    data.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                      help="re-read images for every crop instead of keeping them in memory")
    model = parser.add_argument_group("model")
    sr, osr = ARCH_DEFAULTS["sr"], ARCH_DEFAULTS["odisr"]
    model.add_argument("--arch", choices=ARCHS, default=d.arch,
                       help="sr: CAMixerSR; odisr: CAMixerOSR for 360° panoramas; auto "
                            "(default): that of --init or --resume, else sr")
    model.add_argument("--init", default=None, metavar="NAME_OR_PATH",
                       help="weights to fine-tune (CAMixerSR-S, CAMixerSR-ODISR-x4, or a "
                            "checkpoint path, CAMixerSR or CAMixerOSR); default: from scratch")
    model.add_argument("--n-feats", type=_positive, default=None, metavar="C",
                       help=f"channels when training from scratch (default {sr['n_feats']}: S; "
                            f"odisr {osr['n_feats']})")
    model.add_argument("--blocks", type=_positive, nargs="+", default=None, metavar="N",
                       help="blocks per group from scratch (default "
                            f"{' '.join(map(str, sr['blocks_per_group']))}; odisr "
                            f"{' '.join(map(str, osr['blocks_per_group']))})")
    model.add_argument("--scale", type=_positive, default=None,
                       help="upscale factor (default 4 from scratch; the checkpoint's with --init)")
    model.add_argument("--gamma", type=gamma_type, default=d.gamma, metavar="G",
                       help=f"attention ratio γ of the ratio loss (default {d.gamma})")
    model.add_argument("--val-gamma", type=gamma_type, default=None, metavar="G",
                       help="γ for validation (default: --gamma)")
    model.add_argument("--no-train-noise", dest="train_noise", action="store_false",
                       help="no Gumbel noise in the training mask (deterministic)")
    model.add_argument("--backend", choices=TRAIN_BACKENDS, default=d.backend,
                       help="auto: the Triton kernels on CUDA, the reference elsewhere")
    model.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                       help="bf16: bf16 autocast around the forward and the loss, fp32 master "
                            "weights (CUDA with bf16 support, or the CPU); default off")
    model.add_argument("--device", default=None, metavar="D",
                       help="torch device (default: cuda if available, else cpu; under "
                            "torchrun cuda:LOCAL_RANK)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--iterations", type=_positive, default=d.iterations, metavar="N",
                       help=f"optimiser steps (default {d.iterations})")
    optim.add_argument("--batch-size", type=_positive, default=d.batch_size, metavar="B",
                       help=f"global batch, split over the processes (default {d.batch_size})")
    optim.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help=f"AdamW weight decay (default {d.weight_decay:g})")
    optim.add_argument("--betas", type=float, nargs=2, default=list(d.betas),
                       metavar=("B1", "B2"), help="AdamW betas (default 0.9 0.99)")
    optim.add_argument("--milestones", type=_positive, nargs="*", default=list(d.milestones),
                       metavar="STEP", help="steps where the learning rate is multiplied by "
                                            "--lr-gamma (default 250000 400000 450000 475000)")
    optim.add_argument("--lr-gamma", type=float, default=d.lr_gamma,
                       help=f"learning-rate factor at each milestone (default {d.lr_gamma})")
    optim.add_argument("--ema", type=float, default=d.ema_decay, dest="ema_decay",
                       help=f"EMA decay of the weights (default {d.ema_decay})")
    optim.add_argument("--loss", choices=LOSSES, default=d.loss,
                       help="l1, or ws-l1 for 360° equirectangular images (rows weighted by "
                            "cos of their latitude)")
    optim.add_argument("--seed", type=_count, default=d.seed, help="random seed (default 0)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", required=True, metavar="DIR", dest="out_dir",
                           help="folder for checkpoints and log.jsonl")
    run_group.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                           help="continue from a checkpoint (without CKPT: OUT/last.pth if "
                                "it exists, else start afresh)")
    run_group.add_argument("--val-every", type=_count, default=d.val_every, metavar="N",
                           help=f"validate every N steps, 0: at the end only (default "
                                f"{d.val_every})")
    run_group.add_argument("--save-every", type=_count, default=d.save_every, metavar="N",
                           help=f"write last.pth every N steps, 0: at the end only (default "
                                f"{d.save_every})")
    run_group.add_argument("--log-every", type=_count, default=d.log_every, metavar="N",
                           help=f"log the mean losses every N steps (default {d.log_every})")
    run_group.add_argument("--probe", type=_count, default=None, metavar="N",
                           help="fixed training crops scored with the L1 at each validation "
                                "(default: the batch size)")
    run_group.add_argument("--threads", type=_positive, default=None, metavar="N",
                           help="torch CPU threads per process")
    run_group.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                           help="no progress bar (it is drawn only on a terminal anyway)")
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments."""
    return TrainConfig(
        hr_dir=args.hr_dir, out_dir=args.out_dir, lr_dir=args.lr_dir, val_dir=args.val_dir,
        val_lr_dir=args.val_lr_dir, arch=args.arch, init=args.init, n_feats=args.n_feats,
        blocks_per_group=None if args.blocks is None else tuple(args.blocks), scale=args.scale, gamma=args.gamma,
        val_gamma=args.val_gamma, iterations=args.iterations, batch_size=args.batch_size,
        patch_size=args.patch_size, lr=args.lr, weight_decay=args.weight_decay,
        betas=tuple(args.betas), milestones=tuple(args.milestones), lr_gamma=args.lr_gamma,
        ema_decay=args.ema_decay, loss=args.loss, augment=args.augment, repeat=args.repeat,
        train_noise=args.train_noise, val_every=args.val_every, save_every=args.save_every,
        log_every=args.log_every, probe=args.probe, seed=args.seed, backend=args.backend,
        amp=args.amp,
        device=args.device, workers=args.workers, cache=args.cache, resume=args.resume,
        progress=args.progress)


def run(args: argparse.Namespace) -> int:
    """Train; print the summary as JSON on stdout (rank 0)."""
    main_rank = os.environ.get("RANK", "0") == "0"

    def fail(message: str, status: int) -> int:
        if main_rank:
            print(f"{PROG}: {message}", file=sys.stderr)
        return status

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    check_writable(args.out_dir, os.path.join(args.out_dir, "log.jsonl"))
    try:
        summary = train(config)
    except ConfigError as err:
        return fail(str(err), 2)
    except (DataError, CheckpointError, FileNotFoundError) as err:
        return fail(str(err), 1)
    except (RuntimeError, FloatingPointError, OSError, ValueError) as err:
        return fail(f"training failed: {err}", 1)
    if main_rank:
        print(json.dumps(summary, indent=2))
    return 0
