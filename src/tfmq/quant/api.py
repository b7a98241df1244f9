"""`tfmq.quantize`: one call from a full-precision UNet and calibration data to its quantized twin."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from tfmq.errors import TfmqError
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import QuantizationInfo, model_fingerprint
from tfmq.quant.config import QuantConfig
from tfmq.quant.methods.qdiff import reconstruct_qdiff
from tfmq.quant.methods.reconstruction import calibration_inputs
from tfmq.quant.methods.rtn import calibrate_activation_ranges
from tfmq.quant.methods.tfmq import maintain_temporal_features, reconstruct_tfmq
from tfmq.quant.timestep_table import calibrate_timestep_tables
from tfmq.quant.wrap import quantize_model

# Activation ranges are observed on this many samples of every sampling step (all steps, as the paper).
ACTIVATION_SAMPLES_PER_STEP = 16
CALIBRATION_BATCH_SIZE = 64


def quantize(
    unet: nn.Module, config: QuantConfig, calibration: CalibrationSet, *, source: str = "", progress: bool = True
) -> nn.Module:
    """A quantized copy of `unet` calibrated by `config.method`; `unet` itself stays full precision.

    The steps, in the order of the TFMQ-DM authors' scripts: activation range init on every sampling step;
    for qdiff and tfmq, reconstruction (tfmq: TIAR on the whole schedule first, then the other units) on
    the weight steps; FSC tables when `config.fsc_scope` asks for them (any method); for tfmq with
    `temporal_cache`, the temporal feature caches (and the per-block selection): chosen after TIAR and read
    by the blocks during their reconstruction (without TIAR: chosen after everything else), installed last.

    The result keeps the UNet's class and call signature (it drops into a diffusers pipeline) and carries
    `tfmq_info`, which `save_quantized` needs. With timestep tables or caches it must be called with the
    timesteps of `calibration.schedule`: sample with the schedule the calibration data was recorded on.
    """
    if len(calibration) == 0:
        raise TfmqError("the calibration set is empty")
    fingerprint = model_fingerprint(unet)
    with _user_errors():
        model = quantize_model(unet, config)
    if config.a_bits is not None:
        activation_data = calibration.per_step(ACTIVATION_SAMPLES_PER_STEP)
        calibrate_activation_ranges(model, activation_data, CALIBRATION_BATCH_SIZE, progress)
    extra = {}
    chosen_caches = None
    if config.method in ("qdiff", "tfmq"):
        weight_data = calibration.for_weights()
        if len(weight_data) == 0:
            raise TfmqError("the calibration set has no sample of the weight-reconstruction steps")
        inputs = calibration_inputs(weight_data, CALIBRATION_BATCH_SIZE)
        # FSC over every activation quantizer replaces their ranges afterwards: the steps LSQ would learn
        # are thrown away, so (as in the authors' scripts) no activation learning runs at all.
        recon_config = dataclasses.replace(config, recon_act_iters=0) if config.fsc_scope == "all" else config
        if config.method == "qdiff":
            results = reconstruct_qdiff(model, unet, inputs, recon_config, progress=progress)
        else:
            with _user_errors():
                results, chosen_caches = reconstruct_tfmq(model, unet, inputs, calibration.schedule, recon_config,
                                                          progress=progress)
        extra["reconstruction"] = [result.to_dict() for result in results]
        extra["reconstruction_settings"] = dataclasses.asdict(recon_config.reconstruction)
    with _user_errors():
        if config.fsc_scope != "none":
            calibrate_timestep_tables(model, calibration, config.fsc_scope, momentum=config.fsc_momentum,
                                      init_samples=config.fsc_init_samples, progress=progress)
        if config.temporal_cache:
            extra.update(maintain_temporal_features(model, unet, calibration.schedule, config, chosen_caches))
    model.tfmq_info = QuantizationInfo(config, fingerprint, source, extra)
    return model.eval()


@contextmanager
def _user_errors() -> Iterator[None]:
    """What the model or calibration data cannot do (a ValueError) reaches the user as a TfmqError."""
    try:
        yield
    except ValueError as exc:
        raise TfmqError(str(exc)) from exc
