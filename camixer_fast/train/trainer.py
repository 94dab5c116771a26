"""A training run: :class:`TrainConfig` (the official recipe by default), its backend, and the
:class:`Trainer` that ties data, objective, optimiser, EMA, validation and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from camixer_fast.backends import select_backend
from camixer_fast.evaluation.evaluate import super_resolve
from camixer_fast.models.loading import load_model
from camixer_fast.evaluation.metrics import psnr, ws_psnr
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR
from camixer_fast.train.checkpoints import CHECKPOINT_FORMAT, EMA, read_checkpoint, save_checkpoint
from camixer_fast.train.data import (
    AUGMENTS,
    PairedPatches,
    SampleStream,
    derive_seed,
    load_validation_pairs,
)
from camixer_fast.train.distributed import Rank, setup_distributed
from camixer_fast.train.objective import LOSSES, LossTerms, pixel_loss, training_loss

TRAIN_BACKENDS = ("auto", "reference", "triton")
ARCHS = ("auto", "sr", "odisr")
"""The network: "sr" CAMixerSR, "odisr" CAMixerOSR (360° panoramas), "auto" that of --init or
--resume, else "sr"."""
ARCH_DEFAULTS = {"sr": {"n_feats": 36, "blocks_per_group": (4, 4, 6, 6), "augment": "flip-rot"},
                 "odisr": {"n_feats": 60, "blocks_per_group": (6, 6, 6, 6), "augment": "hflip"}}
"""From-scratch shape and augmentation per network: CAMixerSR-S, the published ODI-SR model."""
AMP_MODES = ("off", "bf16")
"""Mixed precision of the training forward: "off" (fp32) or "bf16" (autocast, fp32 weights)."""
CONTINUITY_KEYS = ("batch_size", "patch_size", "seed", "repeat", "augment", "loss", "hr_dir",
                   "lr_dir", "scale", "train_noise", "amp")


class ConfigError(ValueError):
    """A setting is out of range or cannot be honoured here."""


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults are the official recipe (spec §4).

    batch_size: global; patch_size: the LR crop side; init None: from scratch; scale None: 4 or
    the checkpoint's; repeat None: >= 100 global batches per epoch; an interval of 0 disables it;
    n_feats, blocks_per_group, augment None: the network's (:data:`ARCH_DEFAULTS`).
    """

    hr_dir: str
    out_dir: str
    lr_dir: str | None = None
    val_dir: str | None = None
    val_lr_dir: str | None = None
    init: str | None = None
    arch: str = "auto"
    n_feats: int | None = None
    blocks_per_group: tuple[int, ...] | None = None
    scale: int | None = None
    gamma: float = 0.5
    val_gamma: float | None = None
    iterations: int = 500_000
    batch_size: int = 16
    patch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    milestones: tuple[int, ...] = (250_000, 400_000, 450_000, 475_000)
    lr_gamma: float = 0.5
    ema_decay: float = 0.999
    loss: str = "l1"
    augment: str | None = None
    repeat: int | None = None
    train_noise: bool = True
    val_every: int = 5000
    save_every: int = 5000
    log_every: int = 100
    probe: int | None = None
    seed: int = 0
    backend: str = "auto"
    amp: str = "off"
    device: str | None = None
    workers: int = 0
    cache: bool | None = None
    resume: str | None = None
    progress: bool | None = None

    def check(self) -> None:
        """Raise ConfigError naming the first setting that is out of range."""
        positive = ("iterations", "batch_size", "patch_size", "n_feats")
        for name in positive:
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "save_every", "log_every", "workers", "seed"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scale is not None and self.scale < 1:
            raise ConfigError(f"scale must be >= 1, got {self.scale}")
        if self.repeat is not None and self.repeat < 1:
            raise ConfigError(f"repeat must be >= 1, got {self.repeat}")
        if self.probe is not None and self.probe < 0:
            raise ConfigError(f"probe must be >= 0, got {self.probe}")
        if self.blocks_per_group is not None and (
                not self.blocks_per_group or min(self.blocks_per_group) < 1):
            raise ConfigError("blocks_per_group must be positive counts, got "
                              f"{self.blocks_per_group}")
        for name in ("gamma", "val_gamma"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(
                m < 1 for m in self.milestones):
            raise ConfigError("milestones must be increasing positive steps, got "
                              f"{self.milestones}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.augment is not None and self.augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "odisr":
            check_odisr_settings(self.augment, self.backend)
        if self.backend not in TRAIN_BACKENDS:
            raise ConfigError(f"backend must be one of {TRAIN_BACKENDS}, got {self.backend!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def training_backend(backend: str, device: torch.device | str,
                     dtype: torch.dtype = torch.float32) -> str:
    """The training backend (:func:`~camixer_fast.backends.select_backend` in training mode);
    ConfigError with the reason where it cannot run here."""
    if backend not in TRAIN_BACKENDS:
        raise ConfigError(f"training backend must be one of {TRAIN_BACKENDS}, got {backend!r}")
    try:
        return select_backend(backend, device, dtype, training=True).name
    except RuntimeError as err:
        raise ConfigError(str(err)) from None


def check_amp(amp: str, device: torch.device | str) -> None:
    """ConfigError unless mixed precision ``amp`` (:data:`AMP_MODES`) can run on ``device``."""
    if amp not in AMP_MODES:
        raise ConfigError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    device = torch.device(device)
    if amp == "off":
        return
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"bf16 autocast runs on CUDA and CPU devices, not {device.type!r}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support (compute capability 8.0 or newer "
                          "needed): train with --amp off")


def amp_context(amp: str, device: torch.device | str) -> AbstractContextManager:
    """A fresh ``torch.autocast(device type, bf16)`` for ``amp="bf16"``, else a null context."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def check_odisr_settings(augment: str | None, backend: str) -> None:
    """ConfigError for CAMixerOSR training with a rotation (a crop's rows must stay rows: the
    condition is per row) or the Triton backend (CAMixerOSR's DCN kernel has no backward)."""
    if augment == "flip-rot":
        raise ConfigError("CAMixerOSR trains with --augment hflip or none: 90° rotations turn "
                          "rows into columns and break the latitude condition")
    if backend == "triton":
        raise ConfigError("CAMixerOSR does not train on the Triton backend (its DCN kernel has no "
                          "backward): train it with --backend reference")


def model_arch(model: nn.Module) -> str:
    """"odisr" for CAMixerOSR, "sr" for CAMixerSR."""
    return "odisr" if isinstance(model, CAMixerOSR) else "sr"


def _model_config(model: CAMixerSR | CAMixerOSR) -> dict[str, Any]:
    return {"arch": model_arch(model), "n_feats": model.n_feats, "scale": model.scale,
            "blocks_per_group": list(model.blocks_per_group), "window_size": model.window_size}


def _model_from_config(shape: Mapping[str, Any], **kwargs) -> CAMixerSR | CAMixerOSR:
    """The (untrained) network a checkpoint's ``model_config`` describes."""
    shape = dict(shape)
    network = CAMixerOSR if shape.pop("arch", "sr") == "odisr" else CAMixerSR
    shape["blocks_per_group"] = tuple(shape["blocks_per_group"])
    return network(**shape, **kwargs)


class Trainer:
    """A training run from a :class:`TrainConfig`; bad data or an occupied output folder fail
    here. Rank 0 writes ``last.pth``, ``best.pth`` and ``log.jsonl`` in ``config.out_dir``."""

    def __init__(self, config: TrainConfig, dist_info: Rank | None = None) -> None:
        config.check()
        self.config = config
        self.dist = dist_info if dist_info is not None else setup_distributed(config.device)
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"batch size {config.batch_size} is not divisible by the "
                              f"{self.dist.world_size} processes")
        self.local_batch = config.batch_size // self.dist.world_size
        check_amp(config.amp, self.dist.device)
        self.out_dir = Path(config.out_dir)
        checkpoint = self._resume_checkpoint()
        model = self._build_model(checkpoint)
        self.scale = model.scale
        self.arch = model_arch(model)
        self.augment = config.augment or ARCH_DEFAULTS[self.arch]["augment"]
        if self.arch == "odisr":
            check_odisr_settings(self.augment, config.backend)
        self.repeat = config.repeat
        self.data = PairedPatches(config.hr_dir, scale=self.scale, patch_size=config.patch_size,
                                  lr_dir=config.lr_dir, augment=self.augment,
                                  erp=config.loss == "ws-l1", condition=self.arch == "odisr",
                                  repeat=1, seed=config.seed, cache=config.cache)
        if self.repeat is None:
            self.repeat = max(1, math.ceil(100 * config.batch_size / len(self.data.images)))
        self.data.repeat = self.repeat
        probe_count = config.batch_size if config.probe is None else config.probe
        self.probe_keys = [(0, i % len(self.data)) for i in range(probe_count)]
        self.probe_data = self.data.with_stream(1)
        self.val_pairs = (load_validation_pairs(config.val_dir, self.scale, config.val_lr_dir)
                          if config.val_dir else [])
        self.model = model
        self.ema = EMA(model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                           betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.milestones), gamma=config.lr_gamma)
        self.step = 0
        self.best_psnr: float | None = None
        if checkpoint is not None:
            self._load_state(checkpoint)
        self.net: nn.Module = model
        if self.dist.world_size > 1:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)
        self.noise = torch.Generator(device=self.dist.device)
        self.eval_model: CAMixerSR | CAMixerOSR | None = None

    def _resume_checkpoint(self) -> dict[str, Any] | None:
        resume = self.config.resume
        if not resume:
            if (self.out_dir / "last.pth").exists():
                raise ConfigError(f"{self.out_dir} already holds a training checkpoint "
                                  "(last.pth): resume it, or choose another output folder")
            return None
        path = self.out_dir / "last.pth" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            return None
        return read_checkpoint(path)

    def _build_model(self, checkpoint: Mapping[str, Any] | None) -> CAMixerSR | CAMixerOSR:
        cfg, device = self.config, self.dist.device
        if checkpoint is not None:
            model = _model_from_config(checkpoint["model_config"], gamma=cfg.gamma)
        elif cfg.init is not None:
            model = load_model(cfg.init, gamma=cfg.gamma, backend="reference")
        else:
            arch = "sr" if cfg.arch == "auto" else cfg.arch
            defaults = ARCH_DEFAULTS[arch]
            torch.manual_seed(cfg.seed)
            network = CAMixerOSR if arch == "odisr" else CAMixerSR
            model = network(n_feats=cfg.n_feats or defaults["n_feats"], scale=cfg.scale or 4,
                            blocks_per_group=tuple(cfg.blocks_per_group
                                                   or defaults["blocks_per_group"]),
                            gamma=cfg.gamma)
        if cfg.arch != "auto" and cfg.arch != model_arch(model):
            source = "--resume checkpoint" if checkpoint is not None else "--init weights"
            raise ConfigError(f"--arch {cfg.arch} was asked for but the {source} hold a "
                              f"{type(model).__name__} (arch {model_arch(model)})")
        if cfg.scale is not None and cfg.scale != model.scale:
            raise ConfigError(f"scale {cfg.scale} was asked for but the model is ×{model.scale}")
        model = model.to(device).train()
        if isinstance(model, CAMixerOSR):
            model.backend = "reference"   # its Triton refusal: check_odisr_settings
        else:
            model.backend = training_backend(cfg.backend, device)
        model.train_noise = cfg.train_noise
        return model

    def _load_state(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint.get("train_config") or {}
        current = self.config.to_dict()
        if saved.get("repeat") is None:
            saved = dict(saved, repeat=checkpoint.get("repeat"))
        current["repeat"] = self.repeat
        differ = [k for k in CONTINUITY_KEYS if k in saved and saved[k] != current.get(k)]
        if checkpoint.get("world_size") != self.dist.world_size:
            differ.append("world_size (the Gumbel noise is drawn per process)")
        if differ and self.dist.is_main:
            print(f"camixer-fast train: warning: resuming with settings that differ from the "
                  f"checkpoint's ({', '.join(differ)}); the run will not continue exactly as "
                  "the interrupted one", file=sys.stderr)
        self.model.load_state_dict(checkpoint["params"], strict=True)
        self.ema.load_state_dict(checkpoint["params_ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step = int(checkpoint["step"])
        best = checkpoint.get("best_psnr")
        self.best_psnr = None if best is None else float(best)

    def checkpoint_payload(self) -> dict[str, Any]:
        """``params``, ``params_ema`` and the training state."""
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "params_ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "best_psnr": self.best_psnr,
            "model_config": _model_config(self.model),
            "train_config": self.config.to_dict(),
            "repeat": self.repeat,
            "world_size": self.dist.world_size,
            "format": CHECKPOINT_FORMAT,
        }

    def save(self, name: str = "last.pth") -> Path | None:
        if not self.dist.is_main:
            return None
        path = self.out_dir / name
        save_checkpoint(path, self.checkpoint_payload())
        return path

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def loader(self) -> DataLoader:
        stream = SampleStream(self.data, world_size=self.dist.world_size, rank=self.dist.rank,
                              local_batch=self.local_batch, seed=self.config.seed,
                              start_batch=self.step)
        return DataLoader(self.data, batch_size=self.local_batch, sampler=stream,
                          num_workers=self.config.workers,
                          pin_memory=self.dist.device.type == "cuda",
                          persistent_workers=self.config.workers > 0)

    def train_step(self, batch: Mapping[str, Tensor]) -> LossTerms:
        """One optimiser step on this rank's batch (Gumbel noise seeded by seed, step, rank)."""
        device = self.dist.device
        lr = batch["lr"].to(device, non_blocking=True)
        hr = batch["hr"].to(device, non_blocking=True)
        weight, condition = batch.get("weight"), batch.get("condition")
        weight = None if weight is None else weight.to(device, non_blocking=True)
        condition = None if condition is None else condition.to(device, non_blocking=True)
        self.noise.manual_seed(derive_seed(self.config.seed, 2, self.step, self.dist.rank))
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with amp_context(self.config.amp, device):
            terms = training_loss(self.net, lr, hr, weight, condition=condition,
                                  generator=self.noise)
        if not torch.isfinite(terms.loss):
            raise FloatingPointError(f"the loss is {terms.loss.item()} at step {self.step + 1}; "
                                     "lower the learning rate or check the data")
        terms.total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return terms

    @torch.no_grad()
    def probe_l1(self) -> float | None:
        """Training L1 (no Gumbel noise) on the fixed probe crops, or None without them."""
        if not self.probe_keys:
            return None
        model, device = self.model, self.dist.device
        noise = model.train_noise
        model.train_noise = False
        total = 0.0
        try:
            for start in range(0, len(self.probe_keys), self.local_batch):
                keys = self.probe_keys[start:start + self.local_batch]
                items = [self.probe_data[k] for k in keys]
                lr = torch.stack([it["lr"] for it in items]).to(device)
                hr = torch.stack([it["hr"] for it in items]).to(device)
                weight = (torch.stack([it["weight"] for it in items]).to(device)
                          if "weight" in items[0] else None)
                args = ((torch.stack([it["condition"] for it in items]).to(device),)
                        if "condition" in items[0] else ())
                with amp_context(self.config.amp, device):
                    sr, _ = model(lr, *args)
                total += pixel_loss(sr.float(), hr, weight).item() * len(items)
        finally:
            model.train_noise = noise
        return total / len(self.probe_keys)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean PSNR of the EMA weights on the validation pairs (CAMixerSR: Y, border = scale;
        CAMixerOSR: WS-PSNR of RGB, whole panoramas, the official ODI-SR metric), or None."""
        if not self.val_pairs:
            return None
        if self.eval_model is None:
            self.eval_model = _model_from_config(_model_config(self.model))
            self.eval_model = self.eval_model.to(self.dist.device).eval()
            self.eval_model.backend = self.model.backend
        gamma = self.config.val_gamma if self.config.val_gamma is not None else self.config.gamma
        self.eval_model.gamma = gamma
        self.eval_model.load_state_dict(self.ema.state)
        if self.arch == "odisr":
            scores = [ws_psnr(super_resolve(self.eval_model, lr)[0], hr)
                      for _, lr, hr in self.val_pairs]
        else:
            scores = [psnr(super_resolve(self.eval_model, lr)[0], hr, border=self.scale)
                      for _, lr, hr in self.val_pairs]
        return float(np.mean(scores))

    def evaluate_and_log(self) -> None:
        """Probe L1 and validation PSNR (rank 0), logged; ``best.pth`` on a new best PSNR."""
        if not self.dist.is_main:
            return
        start = time.perf_counter()
        probe = self.probe_l1()
        val = self.validate()
        if probe is None and val is None:
            return
        record = {"event": "val", "step": self.step, "probe_l1": probe, "val_psnr": val,
                  "seconds": round(time.perf_counter() - start, 3)}
        self.log(record)
        parts = [f"step {self.step}"]
        if probe is not None:
            parts.append(f"probe L1 {probe:.5f}")
        if val is not None:
            parts.append(f"val PSNR {val:.3f} dB (EMA)")
        tqdm.write("camixer-fast train: " + ", ".join(parts), file=sys.stderr)
        if val is not None and (self.best_psnr is None or val > self.best_psnr):
            self.best_psnr = val
            if self.step > 0:
                self.save("best.pth")

    def run(self) -> dict[str, Any]:
        """Train until ``config.iterations``; returns a summary dict."""
        cfg = self.config
        quiet = None if cfg.progress is None else not cfg.progress  # None: on a terminal only
        progress = tqdm(total=cfg.iterations, initial=self.step, unit="step", file=sys.stderr,
                        disable=quiet if self.dist.is_main else True, dynamic_ncols=True,
                        leave=False)
        self.log({"event": "start", "step": self.step, "world_size": self.dist.world_size,
                  "device": str(self.dist.device), "arch": self.arch,
                  "backend": self.model.backend,
                  "repeat": self.repeat, "images": len(self.data.images),
                  "config": cfg.to_dict()})
        first = {}
        if self.step == 0 and (self.val_pairs or self.probe_keys):
            self.evaluate_and_log()
            first = self._last_val()
        window: list[LossTerms] = []
        last_terms: LossTerms | None = None
        tick = time.perf_counter()
        batches = iter(self.loader()) if self.step < cfg.iterations else iter(())
        validated = saved = self.step >= cfg.iterations
        while self.step < cfg.iterations:
            last_terms = self.train_step(next(batches))
            window.append(last_terms)
            validated = saved = False
            if not progress.disable:
                progress.set_postfix_str(f"loss {last_terms.loss.item():.5f} "
                                         f"K/N {last_terms.mask_means.mean().item():.3f} "
                                         f"lr {self.scheduler.get_last_lr()[0]:.2e}", refresh=False)
                progress.update(self.step - progress.n)
            if cfg.log_every and self.step % cfg.log_every == 0:
                now = time.perf_counter()
                self._log_window(window, (now - tick) / len(window))
                window, tick = [], now
            if cfg.val_every and self.step % cfg.val_every == 0:
                self.evaluate_and_log()
                validated = True
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
                saved = True
        if window:
            self._log_window(window, (time.perf_counter() - tick) / len(window))
        if not validated:
            self.evaluate_and_log()
            saved = False
        if not saved or not (self.out_dir / "last.pth").exists():
            self.save()
        progress.close()
        last = self._last_val()
        summary = {"step": self.step, "checkpoint": str(self.out_dir / "last.pth"),
                   "probe_l1_first": first.get("probe_l1"), "probe_l1_last": last.get("probe_l1"),
                   "val_psnr_first": first.get("val_psnr"), "val_psnr_last": last.get("val_psnr"),
                   "best_psnr": self.best_psnr}
        if last_terms is not None:
            summary.update(loss=last_terms.loss.item(), l1=last_terms.l1.item(),
                           ratio_loss=last_terms.ratio.item())
        self.log({"event": "end", **summary})
        return summary

    def _last_val(self) -> dict[str, Any]:
        path = self.out_dir / "log.jsonl"
        if not self.dist.is_main or not path.is_file():
            return {}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        vals = [r for r in records if r.get("event") == "val"]
        return vals[-1] if vals else {}

    def _log_window(self, window: Sequence[LossTerms], seconds_per_step: float) -> None:
        masks = torch.stack([t.mask_means for t in window]).mean(0)
        self.log({
            "event": "train", "step": self.step, "lr": self.scheduler.get_last_lr()[0],
            "loss": float(np.mean([t.loss.item() for t in window])),
            "l1": float(np.mean([t.l1.item() for t in window])),
            "ratio_loss": float(np.mean([t.ratio.item() for t in window])),
            "k_fraction": [round(v, 6) for v in masks.tolist()],
            "k_mean": masks.mean().item(),
            "sec_per_step": round(seconds_per_step, 4),
        })

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a whole training (:class:`Trainer`) and return its summary; the process group is
    left however the run ends."""
    config.check()
    dist_info = setup_distributed(config.device)
    try:
        return Trainer(config, dist_info).run()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


__all__ = [
    "AMP_MODES",
    "ARCHS",
    "ARCH_DEFAULTS",
    "CONTINUITY_KEYS",
    "TRAIN_BACKENDS",
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "amp_context",
    "check_amp",
    "check_odisr_settings",
    "model_arch",
    "train",
    "training_backend",
]
