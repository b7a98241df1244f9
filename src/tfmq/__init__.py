"""tfmq: post-training quantization of diffusion models, by the TFMQ-DM method.

    import tfmq
    model = tfmq.load_model("fashion-ddpm")          # or a local diffusers-layout pipeline folder
    calibration = tfmq.collect_calibration(model.unet, model.scheduler)
    qunet = tfmq.quantize(model.unet, tfmq.QuantConfig(method="tfmq", w_bits=4, a_bits=8), calibration)
    images = tfmq.sample(qunet, model.scheduler, num_images=64, seed=0, decoder=model.decoder)

The names load on first use: importing the package does not import torch, so the CLI can set the
OpenMP wait policy onnxruntime needs before torch's thread pool starts.
"""

from __future__ import annotations

import importlib
from typing import Any

from tfmq.errors import TfmqError

__version__ = "0.1.0"
_WHERE = {
    "Conditioning": "tfmq.sampling",
    "DiffusionModel": "tfmq.models.loading",
    "QualityMetrics": "tfmq.metrics",
    "QuantConfig": "tfmq.quant.config",
    "SamplerConfig": "tfmq.sampling",
    "collect_calibration": "tfmq.quant.calibration",
    "load_model": "tfmq.models.loading",
    "load_quantized": "tfmq.quant.checkpoint",
    "quantize": "tfmq.quant.api",
    "sample": "tfmq.sampling",
    "save_quantized": "tfmq.quant.checkpoint",
}
__all__ = ["TfmqError", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tfmq' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
