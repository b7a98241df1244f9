"""A per-step offset taken off a quantized denoiser's output: the part of its error that every sample of a
step shares.

Two quantized models of equal one-step error can drift apart along a trajectory by very different amounts:
what decides it is the share of the error that is the same for every sample of a step, which the sampler
adds up step after step. Its mean over a step's calibration samples, per output channel, is a small table
(steps x channels) that the model subtracts from each call's output at the call's row (the row the
timestep tables select, `tfmq.quant.nn.temporal`). `tfmq.quant.output_correction` measures it.
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq.quant.nn.step_table import StepRows, selected_rows

CORRECTION_NAME = "output_correction"


class OutputCorrection(nn.Module):
    """Lives in the denoiser as the submodule `output_correction`: `offsets` (steps, channels), row i what
    is taken off the output's channels at the schedule's step i. Reads its row from `step_rows`."""

    def __init__(self, offsets: torch.Tensor, step_rows: StepRows | None = None) -> None:
        super().__init__()
        if offsets.dim() != 2:
            raise ValueError(f"output offsets are (steps, channels), got shape {tuple(offsets.shape)}")
        self.register_buffer("offsets", offsets.detach().float().clone())
        self.step_rows = step_rows

    @property
    def channels(self) -> int:
        return self.offsets.shape[1]

    def extra_repr(self) -> str:
        return f"steps={self.offsets.shape[0]}, channels={self.channels}"

    def forward(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`output` (batch, channels, ...) less the offsets of `rows` (default: the rows of the call; a 0-d
        row serves the whole batch)."""
        if output.shape[1] != self.channels:
            raise ValueError(f"the output correction has {self.channels} channels, the model returned "
                             f"{output.shape[1]}")
        if rows is None:
            rows = selected_rows(self.step_rows, self)
        offsets = self.offsets[rows].to(output.dtype)
        return output - offsets.reshape(*offsets.shape[:-1], self.channels, *[1] * (output.dim() - 2))

    def corrected(self, output: object) -> object:
        """A denoiser's return value with its output tensor corrected: a tensor, a tuple whose first item is
        it (`return_dict=False`), or a diffusers output whose `sample` it is (changed in place)."""
        if isinstance(output, torch.Tensor):
            return self(output)
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        output.sample = self(output.sample)
        return output


def output_correction(model: nn.Module) -> OutputCorrection | None:
    """The model's output correction, or None."""
    correction = model._modules.get(CORRECTION_NAME)
    return correction if isinstance(correction, OutputCorrection) else None
