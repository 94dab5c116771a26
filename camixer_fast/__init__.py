"""camixer_fast: CAMixerSR super-resolution on a pure-PyTorch reference and fused Triton kernels.

>>> model = camixer_fast.load_model("CAMixerSR-S", gamma=0.5)
>>> big = camixer_fast.upscale(pil_image)   # PIL / numpy / tensor in, same kind out
"""

from camixer_fast.backends import can_use_triton, resolve_backend
from camixer_fast.models.convert import convert_checkpoint
from camixer_fast.models.loading import CheckpointError, infer_config, load_model
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.inference.pipeline import upscale_batch, upscale_iter
from camixer_fast.inference.api import upscale

__version__ = "0.1.0"

__all__ = [
    "CAMixerSR",
    "CheckpointError",
    "__version__",
    "can_use_triton",
    "convert_checkpoint",
    "export_onnx",
    "infer_config",
    "load_model",
    "resolve_backend",
    "upscale",
    "upscale_batch",
    "upscale_iter",
]


def __getattr__(name: str):
    # imported on first use: it brings in torch.onnx
    if name == "export_onnx":
        from camixer_fast.backends.onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'camixer_fast' has no attribute {name!r}")
