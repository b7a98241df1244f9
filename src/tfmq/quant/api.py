"""`tfmq.quantize`: one call from a full-precision UNet and calibration data to its quantized twin."""

from __future__ import annotations

from torch import nn

from tfmq.errors import TfmqError
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import QuantizationInfo, model_fingerprint
from tfmq.quant.config import QuantConfig
from tfmq.quant.methods.qdiff import reconstruct_qdiff
from tfmq.quant.methods.reconstruction import calibration_inputs
from tfmq.quant.methods.rtn import calibrate_activation_ranges
from tfmq.quant.wrap import quantize_model

# Activation ranges are observed on this many samples of every sampling step (all steps, as the paper).
ACTIVATION_SAMPLES_PER_STEP = 16
CALIBRATION_BATCH_SIZE = 64


def quantize(
    unet: nn.Module, config: QuantConfig, calibration: CalibrationSet, *, source: str = "", progress: bool = True
) -> nn.Module:
    """A quantized copy of `unet` calibrated by `config.method`; `unet` itself stays full precision.

    The result keeps the UNet's class and call signature (it drops into a diffusers pipeline) and carries
    `tfmq_info`, which `save_quantized` needs.
    """
    if len(calibration) == 0:
        raise TfmqError("the calibration set is empty")
    fingerprint = model_fingerprint(unet)
    try:
        model = quantize_model(unet, config)
    except ValueError as exc:
        raise TfmqError(str(exc)) from exc
    if config.method not in ("rtn", "qdiff"):
        raise TfmqError(f"method {config.method!r} is not available yet; use 'rtn' or 'qdiff'")
    if config.a_bits is not None:
        activation_data = calibration.per_step(ACTIVATION_SAMPLES_PER_STEP)
        calibrate_activation_ranges(model, activation_data, CALIBRATION_BATCH_SIZE, progress)
    extra = {}
    if config.method == "qdiff":
        weight_data = calibration.for_weights()
        if len(weight_data) == 0:
            raise TfmqError("the calibration set has no sample of the weight-reconstruction steps")
        results = reconstruct_qdiff(model, unet, calibration_inputs(weight_data, CALIBRATION_BATCH_SIZE), config,
                                    progress=progress)
        extra["reconstruction"] = [result.to_dict() for result in results]
    model.tfmq_info = QuantizationInfo(config, fingerprint, source, extra)
    return model.eval()
