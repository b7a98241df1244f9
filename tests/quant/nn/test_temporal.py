"""The temporal runtime on its own: caches installed by hand (no calibration, no method) serve the row of
each call's timestep, and a model rebuilt empty from the list of cached blocks loads their state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.quant.test_tib import EXPECTED_RESNETS
from tests.quant.tiny_unets import pixel_unet
from tfmq.quant.nn.temporal import (
    SCHEDULE_KEY,
    SkippedTimestepEmbedding,
    TemporalFeatureCache,
    install_temporal_cache,
    restore_temporal_cache,
    timestep_tables,
)

SCHEDULE = torch.tensor([900, 500, 20])


def random_caches(model: nn.Module) -> dict[str, TemporalFeatureCache]:
    generator = torch.Generator().manual_seed(0)
    caches = {}
    for resnet in EXPECTED_RESNETS:
        width = model.get_submodule(resnet).time_emb_proj.out_features
        codes = torch.randint(0, 256, (len(SCHEDULE), width), generator=generator, dtype=torch.uint8)
        caches[resnet] = TemporalFeatureCache(codes, torch.rand(len(SCHEDULE), generator=generator) + 0.1,
                                              torch.randint(0, 256, (len(SCHEDULE),), generator=generator).float())
    return caches


def served_features(model: nn.Module, timestep: int) -> dict[str, torch.Tensor]:
    served = {}
    handles = [model.get_submodule(f"{resnet}.time_emb_proj").register_forward_hook(
        lambda _module, _args, output, resnet=resnet: served.__setitem__(resnet, output)) for resnet in EXPECTED_RESNETS]
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, 8, 8), timestep)
    finally:
        for handle in handles:
            handle.remove()
    return served


def test_caches_serve_the_row_of_the_calls_timestep_and_skip_the_time_mlp() -> None:
    model = pixel_unet()
    caches = random_caches(model)
    assert install_temporal_cache(model, SCHEDULE, caches)
    assert isinstance(model.time_embedding, SkippedTimestepEmbedding)
    for row, timestep in enumerate(SCHEDULE.tolist()):
        for resnet, output in served_features(model, timestep).items():
            assert torch.equal(output, caches[resnet].values()[row].expand(2, -1)), (resnet, timestep)
    assert timestep_tables(model).current_row is None


def test_a_rebuilt_model_loads_the_caches_and_answers_identically() -> None:
    model = pixel_unet()
    install_temporal_cache(model, SCHEDULE, random_caches(model))
    state = model.state_dict()
    rebuilt = pixel_unet(seed=1)
    restore_temporal_cache(rebuilt, state[SCHEDULE_KEY], list(EXPECTED_RESNETS), bits=8)
    empty = rebuilt.state_dict()
    assert {key: (value.shape, value.dtype) for key, value in empty.items()} == {
        key: (value.shape, value.dtype) for key, value in state.items()}
    rebuilt.load_state_dict(state)
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for timestep in SCHEDULE.tolist():
            assert torch.equal(rebuilt(sample, timestep).sample, model(sample, timestep).sample), timestep
    with pytest.raises(ValueError, match="not a residual block"):
        restore_temporal_cache(pixel_unet(), SCHEDULE, ["conv_in"], bits=8)
