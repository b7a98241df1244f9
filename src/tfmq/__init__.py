"""tfmq: post-training quantization of diffusion models, by the TFMQ-DM method.

What `tfmq quantize --method tfmq --out q/` does, in Python:

    import tfmq
    model = tfmq.load_model("fashion-ddpm")          # or a local diffusers-layout pipeline folder
    sampler = tfmq.SamplerConfig(steps=100, skip_type="quad")  # DDIM, eta 0: calibrate and sample with it
    calibration = tfmq.collect_calibration(model.unet, model.scheduler, num_samples=64, config=sampler,
                                           interval_length=5)
    config = tfmq.TFMQConfig(w_bits=4, a_bits=8)     # the CLI's defaults: auto preset
    qunet = tfmq.quantize(model.unet, config, calibration)
    tfmq.save_quantized(qunet, "q/")
    images = tfmq.sample(qunet, model.scheduler, num_images=64, seed=0, config=sampler, decoder=model.decoder)

Every public name is an attribute of this package (`__all__`). They load on first use: importing the
package does not import torch, so the CLI can set the OpenMP wait policy onnxruntime needs before torch's
thread pool starts. The `TYPE_CHECKING` imports below name the same objects for type checkers and editors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tfmq.errors import TfmqError
    from tfmq.export import CompiledUNet, OnnxUNet, export_onnx, trajectory_inputs
    from tfmq.metrics import QualityMetrics, load_reference_statistics
    from tfmq.models.loading import DiffusionModel, load_model
    from tfmq.quant.api import quantize
    from tfmq.quant.calibration import CalibrationSet, collect_calibration
    from tfmq.quant.checkpoint import load_quantized, save_quantized
    from tfmq.quant.config import LayerRule, QDiffusionConfig, QuantConfig, RTNConfig, TFMQConfig
    from tfmq.quant.methods.registry import MethodInputs, register_method
    from tfmq.sampling import Conditioning, SamplerConfig, sample

__version__ = "0.1.0"
# Where each public name lives; tests/test_package.py checks that the TYPE_CHECKING imports say the same.
_WHERE = {
    "CalibrationSet": "tfmq.quant.calibration",
    "CompiledUNet": "tfmq.export",
    "Conditioning": "tfmq.sampling",
    "DiffusionModel": "tfmq.models.loading",
    "OnnxUNet": "tfmq.export",
    "QualityMetrics": "tfmq.metrics",
    "LayerRule": "tfmq.quant.config",
    "MethodInputs": "tfmq.quant.methods.registry",
    "QDiffusionConfig": "tfmq.quant.config",
    "QuantConfig": "tfmq.quant.config",
    "RTNConfig": "tfmq.quant.config",
    "TFMQConfig": "tfmq.quant.config",
    "SamplerConfig": "tfmq.sampling",
    "TfmqError": "tfmq.errors",
    "collect_calibration": "tfmq.quant.calibration",
    "export_onnx": "tfmq.export",
    "load_model": "tfmq.models.loading",
    "load_quantized": "tfmq.quant.checkpoint",
    "load_reference_statistics": "tfmq.metrics",
    "quantize": "tfmq.quant.api",
    "register_method": "tfmq.quant.methods.registry",
    "sample": "tfmq.sampling",
    "save_quantized": "tfmq.quant.checkpoint",
    "trajectory_inputs": "tfmq.export",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tfmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})
