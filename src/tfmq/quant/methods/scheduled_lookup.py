"""The temporal feature caches served to the blocks while they are reconstructed.

Reconstruction replays blocks without the whole model, on batches that mix timesteps, so no model call
selects a row: the row of each sample is found from what the cache site reads (the time embedding, or a
transformer's sinusoid), matched against what it reads at the timesteps of the schedule, and handed to the
site's cache (a `StepTable`) as data.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tfmq.devices import module_device
from tfmq.quant.nn.step_table import StepTable
from tfmq.quant.tib import find_tib


class ScheduledFeatureLookup(nn.Module):
    """Stands in for a cache site (a block's `time_emb_proj`, an embedder's time MLP) while the blocks are
    reconstructed: finds the row of each sample by matching the input it receives against `keys` (what the
    site receives at the timesteps of cache rows `key_rows`) and serves the cache at those rows, one per
    sample."""

    def __init__(self, keys: torch.Tensor, key_rows: torch.Tensor, cache: StepTable, projection: nn.Module) -> None:
        super().__init__()
        if keys.dim() != 2 or key_rows.shape != (len(keys),) or int(key_rows.max()) >= len(cache.codes):
            raise ValueError(f"a feature lookup needs one key per cache row it serves; got {tuple(keys.shape)} keys "
                             f"for rows of shape {tuple(key_rows.shape)} of a {len(cache.codes)}-row cache")
        keys = keys.detach().float().clone()
        self.register_buffer("keys", keys)
        self.register_buffer("key_rows", key_rows.to(device=keys.device, dtype=torch.int64))
        # An embedding matches a key when it lies far closer to it than to any other (stored unit inputs
        # may have been rounded); the keys of distinct timesteps lie far apart.
        apart = torch.cdist(keys, keys) + torch.diag(torch.full((len(keys),), float("inf"), device=keys.device))
        self.tolerance = 0.25 * float(apart.min()) if len(keys) > 1 else 0.25 * float(keys.norm())
        self.cache = cache
        self.projection = projection  # the site it stands in for, put back by `restore_projections`

    @property
    def out_features(self) -> int:
        return self.cache.out_features

    def rows_of(self, embedding: torch.Tensor) -> torch.Tensor:
        """The step index of each sample of `embedding` (batch, width), int64 (batch,)."""
        distances = torch.cdist(embedding.detach().float(), self.keys)
        nearest, rows = distances.min(dim=1)
        if bool((nearest > self.tolerance).any()):
            raise ValueError("a temporal feature lookup received an embedding of no scheduled timestep")
        return self.key_rows[rows]

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.cache(embedding, self.rows_of(embedding))


@torch.no_grad()
def serve_caches_for_reconstruction(
    model: nn.Module, schedule: torch.Tensor, caches: Mapping[str, StepTable], *,
    keyed_at: torch.Tensor | None = None,
) -> None:
    """Make each cache site of `caches` (rows: the timesteps of `schedule`) read its cache through a
    `ScheduledFeatureLookup`, keyed by what the site receives at every timestep of `keyed_at`
    (default: all of `schedule`; the calibration's timesteps, for a cache with rows beyond them). Changes
    `model` in place until `restore_projections`."""
    schedule = torch.as_tensor(schedule, device="cpu")
    keyed_at = schedule if keyed_at is None else torch.as_tensor(keyed_at, device="cpu")
    positions = {int(timestep): row for row, timestep in enumerate(schedule.tolist())}
    missing = [int(t) for t in keyed_at.tolist() if int(t) not in positions]
    if missing:
        raise ValueError(f"timesteps {missing[:5]} have no row in the caches' schedule")
    device = module_device(model)
    key_rows = torch.tensor([positions[int(t)] for t in keyed_at.tolist()], device=device)
    tib = find_tib(model)
    keys, sites = tib.site_inputs(keyed_at.to(device)), tib.cache_sites
    for owner, cache in caches.items():
        module = model.get_submodule(owner)
        site = getattr(module, sites[owner])
        setattr(module, sites[owner], ScheduledFeatureLookup(keys[owner], key_rows, cache, site))


def restore_projections(model: nn.Module) -> None:
    """Put back every cache site that `serve_caches_for_reconstruction` replaced (FSC then calibrates the
    TIB as the blocks' reconstruction left it; `install_temporal_cache` follows)."""
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, ScheduledFeatureLookup):
                setattr(module, name, child.projection)
