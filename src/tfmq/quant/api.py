"""`tfmq.quantize`: one call from a full-precision UNet and calibration data to its quantized twin."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tfmq.quant.methods  # noqa: F401  (registers the built-in methods)
from tfmq import distributed
from tfmq.denoiser import denoiser_call
from tfmq.devices import module_device, resolve_device
from tfmq.errors import TfmqError
from tfmq.quant.activation_ranges import calibrate_activation_ranges
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.config import QuantConfig
from tfmq.quant.methods.registry import MethodInputs, handler_for
from tfmq.quant.methods.resume import UnitCheckpoints
from tfmq.quant.output_correction import calibrate_output_correction
from tfmq.quant.provenance import Provenance, model_fingerprint
from tfmq.quant.wrap import quantize_model


def quantize(
    unet: nn.Module, config: QuantConfig, calibration: CalibrationSet, *, source: str = "", config_folder: str = "",
    progress: bool = True, device: str | torch.device | None = None, checkpoint_dir: str | Path | None = None,
) -> nn.Module:
    """A quantized copy of `unet` calibrated by the method of `config`'s type; `unet` stays full precision.

    Every method starts from the wrapped copy with its weight grids and its activation ranges observed on
    every sampling step; the handler registered for the config (`tfmq.register_method`) does the rest, and
    `config.output_correction` adds its calibration step after it (`tfmq.quant.output_correction`).

    The result keeps the UNet's class and call signature (it drops into a diffusers pipeline) and carries
    its `Provenance` as `tfmq_info` (`source` and `config_folder`: where the base model was loaded from),
    which `save_quantized` writes beside the model. With timestep tables or caches it must be called with the
    timesteps of `calibration.schedule` (sample with the schedule the calibration data was recorded on), or,
    with `config.train_timesteps` (schedule-free), with any timestep of the training range.

    Everything runs where `unet` is, in its dtype (float16 and bfloat16 too; the quantizers' grids are float32);
    `device` ("cuda", "cuda:1", "auto", ...) moves `unet` there first, in place. The calibration set stays in
    host memory, a batch at a time going to the device.

    With `checkpoint_dir` every reconstruction unit is checkpointed there as it finishes, and a call with the
    same arguments after an interruption continues from the last finished unit to the same model, bit for bit
    (`tfmq.quant.methods.resume`); the folder stays until the caller deletes it (`quantize_and_save` does once
    the model is saved). A folder of another config, model or calibration set is an error.
    """
    if not isinstance(config, QuantConfig):
        raise TfmqError(f"config must be a method's QuantConfig (RTNConfig, TFMQConfig, ...), got {config!r}")
    handler = handler_for(config)
    config.check_model(unet)
    if device is not None:
        unet.to(resolve_device(device))
    if len(calibration) == 0:
        raise TfmqError("the calibration set is empty")
    started = time.perf_counter()
    with _user_errors():
        model = quantize_model(unet, config)
        if config.a_bits is not None:
            activation_data = calibration.per_step(config.act_samples_per_step)
            calibrate_activation_ranges(model, activation_data, config.batch_size, progress)
        checkpoints = None if checkpoint_dir is None else UnitCheckpoints.open(
            checkpoint_dir, run_identity(config, unet, calibration), writer=distributed.is_main())
        inputs = MethodInputs(unet, config, calibration, progress, checkpoints)
        results = handler(model, inputs)
        if config.output_correction:
            results = {**results, "output_correction": _correct_output(model, inputs)}
    model.tfmq_info = Provenance.of(config, unet, source=source, config_folder=config_folder,
                                    calibration=calibration_record(calibration, time.perf_counter() - started),
                                    method_results=results)
    return model.eval()


def _correct_output(model: nn.Module, inputs: MethodInputs) -> dict[str, Any]:
    """The output correction step of `config.output_correction`, and what it cost."""
    started = time.perf_counter()
    config = inputs.config
    correction = calibrate_output_correction(
        model, inputs.full_precision, inputs.calibration, table_schedule=inputs.table_schedule,
        samples_per_step=config.output_correction_samples, fill=config.fsc_fill, batch_size=config.batch_size,
        progress=inputs.progress)
    return {"steps": len(inputs.calibration.schedule), "channels": correction.channels,
            "seconds": round(time.perf_counter() - started, 2)}


def run_identity(config: QuantConfig, unet: nn.Module, calibration: CalibrationSet) -> dict[str, Any]:
    """What makes two quantize calls the same run: checkpoints of one are never mixed into another."""
    return {"quant_config": config.to_dict(), "base_model": model_fingerprint(unet),
            "calibration": calibration.identity()}


def calibration_record(calibration: CalibrationSet, quantize_seconds: float) -> dict[str, Any]:
    """What the provenance says of the calibration: the set's own record, and the time quantizing on it took."""
    record: dict[str, Any] = {"samples": len(calibration), "interval_length": calibration.interval_length,
                              "loaded_from": calibration.loaded_from, "quantize_seconds": round(quantize_seconds, 2)}
    if calibration.provenance is not None:
        recorded = calibration.provenance
        record.update(sampler=recorded.sampler.to_dict(), num_samples=recorded.num_trajectories, seed=recorded.seed,
                      guidance_scale=recorded.guidance_scale, collect_seconds=recorded.collect_seconds)
    return record


@torch.no_grad()
def relative_output_error(quantized: nn.Module, full_precision: nn.Module, held_out: CalibrationSet) -> float:
    """||eps_q - eps_fp|| / ||eps_fp|| over `held_out` (UNet inputs the calibration never saw), called one
    timestep at a time as a sampler calls it (per-timestep tables select their row by it)."""
    error_sq = reference_sq = 0.0
    for inputs in held_out.timestep_groups(module_device(quantized)):
        reference = denoiser_call(full_precision, inputs).float()
        error_sq += (denoiser_call(quantized, inputs).float() - reference).pow(2).sum().item()
        reference_sq += reference.pow(2).sum().item()
    return (error_sq / reference_sq) ** 0.5


@contextmanager
def _user_errors() -> Iterator[None]:
    """What the model or calibration data cannot do (a ValueError) reaches the user as a TfmqError."""
    try:
        yield
    except TfmqError:
        raise
    except ValueError as exc:
        raise TfmqError(str(exc)) from exc
