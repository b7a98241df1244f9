"""Per-step tables, and the rows they are read at, handed to them as data.

A sampler visits a finite, known list of timesteps (the schedule), so whatever depends on the timestep
alone can be a table with one row per scheduled step: the FSC ranges of activation quantizers, a residual
block's temporal feature (its cache, or the export graph's table of the TIB). Every such table reads the
row it serves from one `StepRows` per model, an int64 tensor of step indices that its caller sets around
a call, so no row is written into the modules:

- the UNet's forward pre-hook sets one row for the whole batch, from the call's timestep
  (`tfmq.quant.nn.temporal`);
- reconstruction replays blocks on batches mixing timesteps and hands the cache one row per sample, found
  from each sample's embedding (`tfmq.quant.methods.scheduled_lookup`);
- the export graph sets its `step` input, which becomes a Gather in ONNX (`tfmq.export.graph`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class StepRows:
    """The rows of the call in progress, shared by the step tables of one model (a plain object, not a
    module: it holds no state to save, and a deep copy of the model shares its copy among the copy's
    tables). `rows` is None outside a call; calls nest, each putting the outer rows back when it ends."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self._outer: list[torch.Tensor | None] = []

    def enter(self, rows: torch.Tensor | None) -> None:
        """Serve `rows` until the matching `leave` (None: no row, for a call that failed to find one)."""
        self._outer.append(self.rows)
        self.rows = rows

    def leave(self) -> None:
        """Serve the rows of before the last `enter` again (nothing to do without one: an after-call hook
        also runs when a pre-hook before the one that enters failed)."""
        if self._outer:
            self.rows = self._outer.pop()

    @contextmanager
    def serving(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        self.enter(rows)
        try:
            yield rows
        finally:
            self.leave()


def selected_rows(step_rows: StepRows | None, owner: nn.Module) -> torch.Tensor:
    """The rows `owner`'s table is to serve now; an error when no call selected any (never a fallback)."""
    rows = None if step_rows is None else step_rows.rows
    if rows is None:
        raise RuntimeError(
            f"{type(owner).__name__}({owner.extra_repr()}) reads a step table but has no timestep selected: "
            "call the model with its timestep, or use tfmq.quant.nn.selected_timestep(model, t)"
        )
    return rows


class StepTable(nn.Module):
    """Stands in for a module whose output depends on the step alone (a residual block's `time_emb_proj`):
    that output at every scheduled step, one row per step.

    Buffers: `codes` (steps, width) and, for a table quantized per row, `scale` and `zero_point` (one per
    row; the codes are integers on that row's grid). Without them (None, absent from the state) the codes
    are the values themselves. The rows come from `step_rows` (set around each call of the model), or
    from the caller of `forward`; the input is read only for its batch size and dtype.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
                 step_rows: StepRows | None = None) -> None:
        super().__init__()
        steps = len(codes)
        if codes.dim() != 2 or (scale is None) != (zero_point is None) or (
                scale is not None and (scale.shape != (steps,) or zero_point.shape != (steps,))):
            shapes = [None if value is None else tuple(value.shape) for value in (codes, scale, zero_point)]
            raise ValueError(f"a step table is codes (steps, width), with one scale and zero point per step or "
                             f"neither; got shapes {shapes}")
        self.register_buffer("codes", codes.detach().clone())
        self.register_buffer("scale", None if scale is None else scale.detach().float().clone())
        self.register_buffer("zero_point", None if zero_point is None else zero_point.detach().float().clone())
        self.step_rows = step_rows

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    def extra_repr(self) -> str:
        grid = "per-step grid" if self.scale is not None else "values"
        return f"steps={self.codes.shape[0]}, out_features={self.out_features}, codes={self.codes.dtype} ({grid})"

    def at(self, rows: torch.Tensor) -> torch.Tensor:
        """The values of `rows` (int64 step indices, any shape): shape (*rows.shape, width)."""
        codes = self.codes[rows]
        if self.scale is None:
            return codes
        return (codes.float() - self.zero_point[rows].unsqueeze(-1)) * self.scale[rows].unsqueeze(-1)

    def values(self) -> torch.Tensor:
        """The whole table as values: (steps, width), row i what step i is served."""
        return self.at(torch.arange(len(self.codes), device=self.codes.device))

    def forward(self, embedding: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Row `rows` (default: the rows of the call), in the input's dtype. A 0-d row serves the whole
        batch (expanded to it); a 1-D one gives one row per sample, or a single row the block broadcasts."""
        if rows is None:
            rows = selected_rows(self.step_rows, self)
        values = self.at(rows)
        if values.dtype != embedding.dtype:
            values = values.to(embedding.dtype)
        return values.expand(embedding.shape[0], -1) if rows.dim() == 0 else values
