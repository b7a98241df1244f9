"""The Temporal Information Block as a table: every block's temporal feature at every scheduled step.

The TIB depends on the timestep alone, so over a fixed schedule it is a finite table. Computing it in torch
with the fake-quant TIB (its FSC rows, or the temporal feature caches, selected per timestep) gives exactly
the features the fake-quant UNet feeds its blocks; the graph then reads one row per call (a Gather by the
step index) and none of the TIB's small, latency-bound linears runs in the integer graph.
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq.quant.nn.temporal import temporal_features_by_timestep
from tfmq.quant.tib import find_tib


class TemporalFeatureTable(nn.Module):
    """Stands in for a residual block's `time_emb_proj`: row `step` of its features, shape (1, width), which
    the block broadcasts over the batch. `step` (a 0-d int64 tensor) is set by the graph before each call."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("features", features.detach().float().contiguous())
        self.step: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"steps={self.features.shape[0]}, width={self.features.shape[1]}"

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.features.index_select(0, self.step.reshape(1))


@torch.no_grad()
def temporal_feature_tables(model: nn.Module, schedule: torch.Tensor) -> dict[str, torch.Tensor]:
    """{residual block: its temporal features (steps, width)} of `model` at every timestep of `schedule`."""
    tib = find_tib(model)
    features = temporal_features_by_timestep(model, torch.as_tensor(schedule))
    return {resnet: features[name].float() for resnet, name in zip(tib.resnets, tib.feature_names)}
