"""The main job in one place: calibrate on the model's own trajectories, quantize, save, and measure the
quantized UNet on trajectories the calibration never saw. The CLI, the demo and the benchmarks call this, so
they record, time and report a quantization the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tfmq import distributed
from tfmq.models.loading import DiffusionModel
from tfmq.quant.api import quantize, relative_output_error
from tfmq.quant.calibration import CalibrationSet, collect_calibration
from tfmq.quant.checkpoint import WEIGHTS_FILE, save_quantized
from tfmq.quant.config import QuantConfig
from tfmq.quant.methods.resume import remove_checkpoints
from tfmq.sampling import Conditioning, SamplerConfig

# The held-out error: this many trajectories of the next seed, every `HELD_OUT_INTERVAL`-th step of each.
HELD_OUT_TRAJECTORIES = 8
HELD_OUT_INTERVAL = 10
CHECKPOINTS_SUFFIX = ".tfmq-checkpoints"
# One condition per trajectory (None for an unconditional model): how many conditions -> conditioning.
ConditioningFor = Callable[[int], "Conditioning | None"]


@dataclass(frozen=True)
class CalibrationSettings:
    """Which trajectories calibrate: `num_samples` seeds of `sampler` from `seed`, every step recorded,
    weight reconstruction on every `interval_length`-th (the paper's `--interval_length`); beyond
    `memory_budget_mb` the recorded set is kept on disk."""

    num_samples: int = 64
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    interval_length: int = 5
    seed: int = 0
    batch_size: int = 64
    memory_budget_mb: float | None = None


@dataclass(frozen=True)
class QuantizationReport:
    """What one quantization cost and gave: where it went, its timings, its held-out error and its size."""

    out: Path
    config: QuantConfig
    calibration_samples: int
    collect_seconds: float
    quantize_seconds: float
    relative_output_error: float
    file_bytes: int
    fp32_bytes: int

    def row(self) -> dict[str, Any]:
        """The summary row `tfmq quantize` prints."""
        return {
            **self.config.summary(),
            "calib samples": self.calibration_samples,
            "calib s": round(self.collect_seconds + self.quantize_seconds, 1),
            "rel. output error": self.relative_output_error, "size MB": self.file_bytes / 1e6,
            "fp32 MB": self.fp32_bytes / 1e6, "smaller": f"{self.fp32_bytes / self.file_bytes:.1f}x",
        }


def calibrate(model: DiffusionModel, settings: CalibrationSettings, conditioning_for: ConditioningFor,
              progress: bool = True) -> CalibrationSet:
    """The calibration set of `settings`, recorded from `model`'s full-precision sampler."""
    return collect_calibration(model.unet, model.scheduler, settings.num_samples, settings.sampler,
                               settings.interval_length, settings.seed, settings.batch_size, progress,
                               conditioning_for(settings.num_samples), memory_budget_mb=settings.memory_budget_mb)


def checkpoint_folder(out: str | Path) -> Path:
    """Where the per-unit checkpoints of a quantization to `out` go while it runs: beside it."""
    out = Path(out)
    return out.with_name(out.name + CHECKPOINTS_SUFFIX)


def quantize_and_save(
    model: DiffusionModel, config: QuantConfig, calibration: CalibrationSet, out: str | Path, *,
    conditioning_for: ConditioningFor, overwrite: bool = False, progress: bool = True, resumable: bool = False,
) -> tuple[nn.Module, QuantizationReport | None]:
    """Quantize `model.unet` on `calibration`, save it to `out`, and measure its relative output error on
    held-out trajectories (the next seed, `conditioning_for` them). `resumable`: checkpoint every
    reconstruction unit in `checkpoint_folder(out)`, continue from there if an earlier run was interrupted,
    and delete the folder once the model is saved. Under a process group (`tfmq.distributed`) every rank
    quantizes, only the main one saves and reports: the others get None for the report."""
    checkpoints = checkpoint_folder(out) if resumable else None
    quantized = quantize(model.unet, config, calibration, source=model.source,
                         config_folder=model.reference.get("config", ""), progress=progress,
                         checkpoint_dir=checkpoints)
    folder = save_quantized(quantized, out, overwrite=overwrite) if distributed.is_main() else None
    if checkpoints is not None and folder is not None:
        remove_checkpoints(checkpoints)
    recorded = quantized.tfmq_info.calibration
    provenance = calibration.provenance
    held_out = collect_calibration(model.unet, model.scheduler, HELD_OUT_TRAJECTORIES, provenance.sampler,
                                   HELD_OUT_INTERVAL, provenance.seed + 1, progress=False,
                                   conditioning=conditioning_for(HELD_OUT_TRAJECTORIES))  # by every rank
    if folder is None:
        return quantized, None
    report = QuantizationReport(
        out=folder, config=config, calibration_samples=len(calibration),
        collect_seconds=provenance.collect_seconds or 0.0, quantize_seconds=recorded["quantize_seconds"],
        relative_output_error=relative_output_error(quantized, model.unet, held_out),
        file_bytes=(folder / WEIGHTS_FILE).stat().st_size,
        fp32_bytes=sum(p.numel() * p.element_size() for p in model.unet.parameters()),
    )
    return quantized, report
