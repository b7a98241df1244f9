"""The temporal runtime on its own: step tables serve the rows handed to them, caches installed by hand
(no calibration, no method) serve the row of each call's timestep, and a model rebuilt empty from the list
of cached blocks loads their state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.quant.test_tib import EXPECTED_RESNETS
from tests.quant.tiny_unets import pixel_unet
from tfmq.quant.nn.step_table import StepRows, StepTable
from tfmq.quant.nn.temporal import (
    SCHEDULE_KEY,
    SkippedTimestepEmbedding,
    install_temporal_cache,
    restore_temporal_cache,
    timestep_tables,
)

SCHEDULE = torch.tensor([900, 500, 20])


def random_caches(model: nn.Module) -> dict[str, StepTable]:
    generator = torch.Generator().manual_seed(0)
    caches = {}
    for resnet in EXPECTED_RESNETS:
        width = model.get_submodule(resnet).time_emb_proj.out_features
        codes = torch.randint(0, 256, (len(SCHEDULE), width), generator=generator, dtype=torch.uint8)
        caches[resnet] = StepTable(codes, torch.rand(len(SCHEDULE), generator=generator) + 0.1,
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
    assert timestep_tables(model).step_rows.rows is None


def test_a_rebuilt_model_loads_the_caches_and_answers_identically() -> None:
    model = pixel_unet()
    install_temporal_cache(model, SCHEDULE, random_caches(model))
    state = model.state_dict()
    rebuilt = pixel_unet(seed=1)
    restore_temporal_cache(rebuilt, state[SCHEDULE_KEY], list(EXPECTED_RESNETS), torch.uint8)
    empty = rebuilt.state_dict()
    assert {key: (value.shape, value.dtype) for key, value in empty.items()} == {
        key: (value.shape, value.dtype) for key, value in state.items()}
    rebuilt.load_state_dict(state)
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for timestep in SCHEDULE.tolist():
            assert torch.equal(rebuilt(sample, timestep).sample, model(sample, timestep).sample), timestep
    with pytest.raises(ValueError, match="conv_in holds no module a temporal feature cache stands in for"):
        restore_temporal_cache(pixel_unet(), SCHEDULE, ["conv_in"], torch.uint8)


def quantized_table(step_rows: StepRows | None = None) -> StepTable:
    generator = torch.Generator().manual_seed(3)
    return StepTable(torch.randint(0, 256, (4, 5), generator=generator, dtype=torch.uint8),
                     torch.rand(4, generator=generator) + 0.1, torch.randint(0, 256, (4,), generator=generator).float(),
                     step_rows)


def test_a_step_table_serves_each_sample_the_row_handed_to_it() -> None:
    table = quantized_table()
    values = (table.codes.float() - table.zero_point[:, None]) * table.scale[:, None]
    assert torch.equal(table.values(), values)
    rows = torch.tensor([2, 0, 2, 3])
    assert torch.equal(table(torch.zeros(4, 7), rows), values[[2, 0, 2, 3]])
    assert table(torch.zeros(4, 7, dtype=torch.float64), rows).dtype == torch.float64
    plain = StepTable(values)  # no grid: the codes are the values
    assert plain.scale is None and set(plain.state_dict()) == {"codes"}
    assert torch.equal(plain(torch.zeros(4, 7), rows), values[[2, 0, 2, 3]])


def test_a_step_table_serves_one_row_to_the_whole_batch_from_the_shared_rows() -> None:
    step_rows = StepRows()
    tables = [quantized_table(step_rows), StepTable(torch.randn(4, 5), step_rows=step_rows)]
    with step_rows.serving(torch.tensor(1)):
        for table in tables:
            assert torch.equal(table(torch.zeros(3, 7)), table.values()[1].expand(3, -1))
        with step_rows.serving(torch.tensor([3])):  # one row the caller broadcasts (the export graph's)
            assert torch.equal(tables[0](torch.zeros(3, 7)), tables[0].values()[[3]])
        assert torch.equal(step_rows.rows, torch.tensor(1))  # the outer row again
    assert step_rows.rows is None


def test_a_step_table_without_a_selected_row_is_an_error() -> None:
    for table in (quantized_table(), quantized_table(StepRows())):  # unbound, and bound but outside a call
        with pytest.raises(RuntimeError, match=r"StepTable\(steps=4, .*no timestep selected"):
            table(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="one scale and zero point per step or neither"):
        StepTable(torch.zeros(4, 5), torch.ones(4))


def test_the_rows_of_a_call_persist_nowhere_after_it() -> None:
    model = pixel_unet()
    install_temporal_cache(model, SCHEDULE, random_caches(model))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    step_rows = timestep_tables(model).step_rows
    with torch.no_grad():
        model(torch.zeros(1, 3, 8, 8), 500)
        with pytest.raises(ValueError, match="timestep 501"):
            model(torch.zeros(1, 3, 8, 8), 501)
    # one selection for the whole model, empty again; no module keeps a row of its own, nor does the state
    shared = {id(module.step_rows) for module in model.modules() if isinstance(module, StepTable)}
    assert shared == {id(step_rows)} and step_rows.rows is None and step_rows._outer == []
    assert not any(isinstance(value, torch.Tensor) for module in model.modules() for value in vars(module).values())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert set(model.state_dict()) == set(state)
