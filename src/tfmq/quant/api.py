"""`tfmq.quantize`: one call from a full-precision UNet and calibration data to its quantized twin."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tfmq.errors import TfmqError
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import QuantizationInfo, model_fingerprint
from tfmq.quant.config import QuantConfig
from tfmq.quant.methods.qdiff import reconstruct_qdiff
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
    labels = calibration.conditions.get("class_labels")
    if config.temporal_cache and labels is not None:
        raise TfmqError("a temporal feature cache per (timestep, class) is not supported: a class-conditional "
                        "model's temporal features depend on the label; use temporal_cache=False")
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
        inputs = weight_data.batches(CALIBRATION_BATCH_SIZE)
        # FSC over every activation quantizer replaces their ranges afterwards: the steps LSQ would learn
        # are thrown away, so (as in the authors' scripts) no activation learning runs at all.
        recon_config = dataclasses.replace(config, recon_act_iters=0) if config.fsc_scope == "all" else config
        if config.method == "qdiff":
            results = reconstruct_qdiff(model, unet, inputs, recon_config, progress=progress)
        else:
            timesteps, tib_labels = _temporal_inputs(calibration)
            with _user_errors():
                results, chosen_caches = reconstruct_tfmq(model, unet, inputs, timesteps, recon_config,
                                                          progress=progress, class_labels=tib_labels)
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


@torch.no_grad()
def relative_output_error(quantized: nn.Module, full_precision: nn.Module, held_out: CalibrationSet) -> float:
    """||eps_q - eps_fp|| / ||eps_fp|| over `held_out` (UNet inputs the calibration never saw), called one
    timestep at a time as a sampler calls it (per-timestep tables select their row by it)."""
    error_sq = reference_sq = 0.0
    for inputs in held_out.timestep_groups():
        reference = full_precision(**inputs).sample
        error_sq += (quantized(**inputs).sample - reference).pow(2).sum().item()
        reference_sq += reference.pow(2).sum().item()
    return (error_sq / reference_sq) ** 0.5


def _temporal_inputs(calibration: CalibrationSet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the TIB is reconstructed on: every scheduled timestep, or for a class-conditional model every
    (timestep, label) pair of the calibration data (the unconditional branch's null label included)."""
    labels = calibration.conditions.get("class_labels")
    if labels is None:
        return calibration.schedule, None
    pairs = torch.stack([calibration.timesteps.long(), labels.long()], dim=1).unique(dim=0)
    return pairs[:, 0], pairs[:, 1]


@contextmanager
def _user_errors() -> Iterator[None]:
    """What the model or calibration data cannot do (a ValueError) reaches the user as a TfmqError."""
    try:
        yield
    except ValueError as exc:
        raise TfmqError(str(exc)) from exc
