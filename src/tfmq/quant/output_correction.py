"""Measuring a quantized denoiser's output correction (`tfmq.quant.nn.output_correction`): at every
calibrated step, the mean of its output error against full precision over that step's calibration samples,
per output channel.

A calibration step after the method's own (any method: it reads the finished model). The mean is over both
branches of a guided set, as the denoiser sees them, and over every output channel a model returns (a DiT's
learned-variance channels too). A schedule-free model's uncalibrated rows are filled from the calibrated ones
around them as its FSC tables are (`fsc_fill`). With several processes each takes its share of every step's
samples and the sums are added up, so every rank installs the same table.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from tfmq import distributed
from tfmq.denoiser import denoiser_call
from tfmq.devices import module_device
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.nn.output_correction import OutputCorrection, output_correction
from tfmq.quant.nn.temporal import attach_output_correction, checked_schedule, timestep_tables
from tfmq.quant.timestep_table import checked_calibration_schedule, filled_rows


@torch.no_grad()
def calibrate_output_correction(
    model: nn.Module, full_precision: nn.Module, calibration: CalibrationSet, *,
    table_schedule: torch.Tensor | None = None, samples_per_step: int | None = None, fill: str = "linear",
    batch_size: int = 64, progress: bool = True,
) -> OutputCorrection:
    """Give `model` (quantized, calibrated) the per-step, per-channel mean of its output error against
    `full_precision` over `samples_per_step` samples of each step of `calibration` (None: all of them).

    `table_schedule` (default: the calibration's) is the schedule of the model's timestep tables; a
    schedule-free one (every training timestep) has its uncalibrated rows filled by `fill`. Changes `model`
    in place and returns its correction."""
    if samples_per_step is not None and (isinstance(samples_per_step, bool) or not isinstance(samples_per_step, int)
                                         or samples_per_step < 1):
        raise ValueError(f"samples_per_step must be a positive int or None, got {samples_per_step!r}")
    if output_correction(model) is not None:
        raise ValueError(f"{type(model).__name__} already carries an output correction")
    schedule = checked_calibration_schedule(calibration)
    table_schedule = schedule if table_schedule is None else checked_schedule(table_schedule)
    tables = timestep_tables(model)
    if tables is not None and not torch.equal(tables.schedule.cpu(), table_schedule):
        raise ValueError(f"{type(model).__name__}'s timestep tables serve another schedule than {len(table_schedule)} "
                         "steps of the output correction")
    row_of = {int(timestep): row for row, timestep in enumerate(table_schedule.tolist())}
    missing = [int(timestep) for timestep in schedule if int(timestep) not in row_of]
    if missing:
        raise ValueError(f"the table schedule has no row for {len(missing)} calibrated timestep(s), e.g. {missing[0]}")
    data = calibration if samples_per_step is None else calibration.per_step(samples_per_step)
    device = module_device(model)
    step_indices = data.step_indices.cpu()
    # every rank learns the width from one sample, so a rank left without samples still adds its zeros
    channels = denoiser_call(full_precision, data.inputs(torch.tensor([0], device="cpu"), device)).shape[1]
    # host bookkeeping: the errors come back to the CPU, so these never follow a default device
    sums = torch.zeros(len(schedule), channels, dtype=torch.float64, device="cpu")
    counts = torch.zeros(len(schedule), 1, dtype=torch.float64, device="cpu")
    for step in tqdm(range(len(schedule)), desc="output correction", unit="step", disable=not progress):
        indices = (step_indices == step).nonzero().flatten()
        share = distributed.shard(len(indices))
        for batch in indices[share.start:share.stop].split(batch_size):
            inputs = data.inputs(batch, device)
            error = (denoiser_call(model, inputs).float() - denoiser_call(full_precision, inputs).float()).cpu()
            sums[step] += error.transpose(0, 1).reshape(channels, -1).sum(dim=1, dtype=torch.float64)
            counts[step] += error.numel() / channels
    sums, counts = distributed.sum_over_ranks(torch.cat([sums, counts], dim=1)).split([channels, 1], dim=1)
    offsets = torch.zeros(len(table_schedule), channels, device="cpu")
    calibrated = torch.zeros(len(table_schedule), dtype=torch.bool, device="cpu")
    rows = torch.tensor([row_of[int(timestep)] for timestep in schedule], device="cpu")
    offsets[rows] = (sums / counts).float()
    calibrated[rows] = True
    filled, left, right, weight = filled_rows(calibrated, fill)
    offsets[filled] = torch.lerp(offsets[left], offsets[right], weight[:, None])
    return attach_output_correction(model, table_schedule, offsets)
