"""CAMixerSR as a spandrel architecture (chaiNNer, ComfyUI and other spandrel users).

>>> import spandrel, camixer_fast.spandrel_arch
>>> camixer_fast.spandrel_arch.install()            # adds CAMixerSR to spandrel.MAIN_REGISTRY
>>> model = spandrel.ModelLoader().load_from_file("CAMixerSR_S.pth")

Detection needs CAMixerSR's own module names and shapes :func:`~camixer_fast.infer_config`
reads, so other architectures (ClassSR's) are not claimed. A CAMixerOSR (ODI-SR) state dict is
claimed and refused with a CheckpointError naming :func:`camixer_fast.upscale`: a host's tiles
would each be taken as a whole panorama (wrong latitudes, no wrap at the 0°/360° seam).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

try:
    from spandrel import (
        MAIN_REGISTRY,
        Architecture,
        ArchRegistry,
        ArchSupport,
        ImageModelDescriptor,
        ModelTiling,
        SizeRequirements,
        StateDict,
    )
except ImportError as err:
    if err.name != "spandrel":
        raise ImportError(f"camixer_fast.spandrel_arch: spandrel cannot be imported ({err}); "
                          "install torchvision, the build made for your torch") from None
    raise ImportError("camixer_fast.spandrel_arch needs spandrel: "
                      "pip install 'camixer_fast[spandrel]'") from None
except Exception as err:  # noqa: BLE001 - a torchvision built for another torch: RuntimeError
    reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    raise ImportError(
        f"camixer_fast.spandrel_arch: spandrel cannot be imported because torchvision does not "
        f"load beside torch {torch.__version__} ({reason}); install a torch/torchvision pair "
        f"that import together (torchvision's release for your torch, from the same CPU or "
        f"CUDA index)") from None

from camixer_fast.evaluation.cost import MODEL_SIZES
from camixer_fast.models.loading import (CheckpointError, build_model, infer_config,
                                         infer_osr_config, is_osr_state_dict)
from camixer_fast.reference.model import CAMixerSR

ARCH_ID = "CAMixerSR"

SIGNATURE = (
    "head.weight",
    "global_predictor.0.weight",
    "global_predictor.2.weight",
    "body.0.body.0.norm1.weight",
    "body.0.body.0.mixer.project_v.weight",
    "body.0.body.0.mixer.project_q.weight",
    "body.0.body.0.mixer.project_k.weight",
    "body.0.body.0.mixer.conv_sptial.0.weight",
    "body.0.body.0.mixer.conv_sptial.1.weight",
    "body.0.body.0.mixer.route.in_conv.0.weight",
    "body.0.body.0.mixer.route.out_offsets.0.weight",
    "body.0.body.0.mixer.route.out_mask.0.weight",
    "body.0.body.0.mixer.route.out_CA.1.weight",
    "body.0.body.0.mixer.route.out_SA.0.weight",
    "body.0.body.0.ffn.project_in.weight",
    "body.0.body.0.ffn.dwconv.weight",
    "body.0.body_tail.weight",
    "body_tail.weight",
    "tail.0.weight",
)


OSR_SIGNATURE = ("head.weight", "offset_conv.0.weight", "dcn.weight", "dcn.conv_offset.weight",
                 "body.0.offset_conv.0.weight", "body.0.body_tail.conv_offset.weight",
                 "body.0.body.0.mixer.route.out_mask.0.weight", "tail.0.weight")


def is_odisr(state_dict: Mapping[str, object]) -> bool:
    """Whether ``state_dict`` is a readable CAMixerOSR (ODI-SR) one."""
    if not all(key in state_dict for key in OSR_SIGNATURE):
        return False
    try:
        infer_osr_config(state_dict)  # type: ignore[arg-type]
    except (CheckpointError, AttributeError, IndexError, TypeError, KeyError):
        return False
    return is_osr_state_dict(state_dict)  # type: ignore[arg-type]


def detect(state_dict: Mapping[str, object]) -> bool:
    """Whether ``state_dict`` has the :data:`SIGNATURE` keys and readable hyperparameters (or
    is CAMixerOSR's, refused by :meth:`CAMixerSRArch.load`)."""
    if is_odisr(state_dict):
        return True
    if not all(key in state_dict for key in SIGNATURE):
        return False
    try:
        infer_config(state_dict)  # type: ignore[arg-type]
    except (CheckpointError, AttributeError, IndexError, TypeError):
        return False
    return True


class CAMixerSRArch(Architecture[CAMixerSR]):
    """The spandrel description of :class:`~camixer_fast.CAMixerSR`."""

    def __init__(self) -> None:
        super().__init__(id=ARCH_ID, name="CAMixerSR", detect=detect)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[CAMixerSR]:
        """A descriptor around a CAMixerSR shaped after ``state_dict`` (γ = 0.5, expected
        routing, the "auto" backend per call's device); CheckpointError for CAMixerOSR."""
        if is_odisr(state_dict):
            raise CheckpointError(
                "a CAMixerOSR (ODI-SR, 360° panorama) state dict: not offered through spandrel, "
                "whose hosts tile images without the latitude rows and the horizontal wrap a "
                "panorama needs; use camixer_fast.upscale(img, weights=...) or "
                "'camixer-fast upscale --weights ...'")
        model = build_model(state_dict).eval()
        model.backend = "auto"
        size = next((name for name, c in MODEL_SIZES.items() if c == model.n_feats), None)
        tags = [f"{model.n_feats}nf", "blocks " + "-".join(map(str, model.blocks_per_group)),
                f"window {model.window_size}"]
        if size is not None:
            tags.insert(0, size)
        return ImageModelDescriptor(
            model,
            state_dict,
            architecture=self,
            purpose="SR",
            tags=tags,
            supports_half=True,
            supports_bfloat16=True,
            scale=model.scale,
            input_channels=3,
            output_channels=3,
            # any size: the model pads to its window grid itself
            size_requirements=SizeRequirements(),
            tiling=ModelTiling.SUPPORTED,
        )


CAMIXER_REGISTRY = ArchRegistry()
CAMIXER_REGISTRY.add(ArchSupport.from_architecture(CAMixerSRArch()))


def install(registry: ArchRegistry = MAIN_REGISTRY, *,
            ignore_duplicates: bool = True) -> list[ArchSupport]:
    """Add CAMixerSR to ``registry`` (default: spandrel's main one); returns what was added."""
    return registry.add(*CAMIXER_REGISTRY, ignore_duplicates=ignore_duplicates)


__all__ = ["ARCH_ID", "CAMIXER_REGISTRY", "CAMixerSRArch", "detect", "install", "is_odisr"]
