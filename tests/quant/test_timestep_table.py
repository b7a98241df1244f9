from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.quant.test_tib import EXPECTED_FEATURES, class_unet
from tests.quant.tiny_unets import one_thread, pixel_unet
from tfmq.quant.activation_ranges import calibrate_activation_ranges
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import METADATA_FILE, load_quantized, save_quantized
from tfmq.quant.config import QuantConfig, RTNConfig, TFMQConfig
from tfmq.quant.provenance import Provenance
from tfmq.quant.wrap import activation_quantizers, quantize_model, quantizers, set_quant_state
from tfmq.quant.nn.quantizer import range_to_scale_zero_point
from tfmq.quant.nn.temporal import selected_timestep, temporal_features_by_timestep, timestep_tables, training_schedule
from tfmq.quant.tib import find_tib
from tfmq.quant.timestep_table import attach_timestep_tables, calibrate_timestep_tables, table_quantizers

# A sampler's schedule, in sampling order, and the row each timestep must get.
SCHEDULE = torch.tensor([900, 700, 400, 150, 10])
SAMPLES_PER_STEP = 6
TEMPORAL_QUANTIZERS = {"time_embedding.linear_2.input_quantizer"} | {
    f"{feature}.input_quantizer" for feature in EXPECTED_FEATURES
}
FAST = dict(weight_init="minmax", act_init="minmax")


def calibration_set(samples_per_step: int = SAMPLES_PER_STEP, seed: int = 0) -> CalibrationSet:
    generator = torch.Generator().manual_seed(seed)
    steps = torch.arange(len(SCHEDULE)).repeat_interleave(samples_per_step)
    samples = torch.randn(len(steps), 3, 8, 8, generator=generator)
    return CalibrationSet(samples, SCHEDULE[steps], steps, SCHEDULE)


def wrapped(scope: str) -> nn.Module:
    """pixel_unet quantized W4A8 with shared activation ranges, ready for timestep tables."""
    config = RTNConfig(**FAST, fsc_scope=scope)
    model = quantize_model(pixel_unet(), config)
    calibrate_activation_ranges(model, calibration_set(), 64, progress=False)
    model.tfmq_info = Provenance.of(config, pixel_unet())
    return model


def with_tables(scope: str, **calibrate_options: object) -> nn.Module:
    model = wrapped(scope)
    calibrate_timestep_tables(model, calibration_set(), scope, progress=False, **calibrate_options)
    return model


@pytest.fixture(scope="module")
def temporal_model() -> nn.Module:
    with one_thread():  # the thread count the tests then run on: a matmul's last bit may depend on it
        return with_tables("temporal", momentum=None)


@pytest.fixture(scope="module")
def all_model() -> nn.Module:
    return with_tables("all")


def rows_seen_during_calls(model: nn.Module, quantizer_name: str, timesteps: list[object]) -> list[int | None]:
    quantizer = model.get_submodule(quantizer_name)
    seen = []
    handle = quantizer.register_forward_pre_hook(lambda module, _args: seen.append(int(module.step_rows.rows)))
    try:
        with torch.no_grad():
            for timestep in timesteps:
                model(torch.zeros(2, 3, 8, 8), timestep)
    finally:
        handle.remove()
    return seen


def test_temporal_scope_tables_the_inputs_of_the_temporal_feature_readers(temporal_model: nn.Module) -> None:
    tabled = dict(table_quantizers(temporal_model))
    assert set(tabled) == TEMPORAL_QUANTIZERS
    for quantizer in tabled.values():
        assert quantizer.table_scale.shape == quantizer.table_zero_point.shape == (len(SCHEDULE),)
        assert bool(quantizer.table_initialized.all())
    tables = timestep_tables(temporal_model)
    assert tables.scope == "temporal" and torch.equal(tables.schedule, SCHEDULE)


def test_all_scope_gives_every_activation_quantizer_a_table(all_model: nn.Module) -> None:
    tabled = set(dict(table_quantizers(all_model)))
    assert tabled == {name for name, _ in activation_quantizers(all_model)}
    assert TEMPORAL_QUANTIZERS < tabled
    assert any(name.endswith("processor.probs_quantizer") for name in tabled)
    assert any(name.endswith("split_input_quantizer") for name in tabled)
    assert not any(name.endswith("weight_quantizer") for name in tabled)
    assert all(bool(quantizer.table_initialized.all()) for _, quantizer in table_quantizers(all_model))


def inputs_of(model: nn.Module, names: set[str], run) -> dict[str, torch.Tensor]:
    """The input every quantizer in `names` receives during `run()` as calibration sees it: the tabled
    quantizers pass their inputs through, the rest of the model is quantized as it is set."""
    model = copy.deepcopy(model)
    for _, quantizer in table_quantizers(model):
        quantizer.enabled = False
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, name=name: captured[name].append(args[0].detach()))
    with torch.no_grad():
        run(model)
    return {name: torch.cat([values.flatten() for values in batches]) for name, batches in captured.items()}


def test_rows_are_the_exact_range_of_each_timesteps_temporal_features(temporal_model: nn.Module) -> None:
    # Without a class embedding the temporal features of a timestep are the same for every sample, so
    # a min-max row must equal the range of that timestep's feature: row i belongs to SCHEDULE[i].
    # (Same batch as the calibration: a matmul's last bit may depend on the batch size.)
    for row, timestep in enumerate(SCHEDULE.tolist()):
        batch = torch.full((SAMPLES_PER_STEP,), timestep)
        observed = inputs_of(temporal_model, TEMPORAL_QUANTIZERS,
                             lambda model, batch=batch: find_tib(model).temporal_features(batch))
        for name, values in observed.items():
            quantizer = temporal_model.get_submodule(name)
            scale, zero_point = range_to_scale_zero_point(values.min(), values.max(), 8)
            assert torch.equal(quantizer.table_scale[row], scale), (name, row)
            assert torch.equal(quantizer.table_zero_point[row], zero_point), (name, row)


def test_rows_differ_across_timesteps_for_the_temporal_features(temporal_model: nn.Module) -> None:
    for name in TEMPORAL_QUANTIZERS:
        assert len(temporal_model.get_submodule(name).table_scale.unique()) == len(SCHEDULE), name


@pytest.mark.parametrize("momentum", [0.95, None])
def test_rows_follow_the_authors_moving_min_max(momentum: float | None) -> None:
    init_samples, batch_size = 4, 4  # 6 samples a step: init on 4 spread over them, moving updates on 4 and 2
    model = with_tables("all", momentum=momentum, init_samples=init_samples, batch_size=batch_size)
    name = "down_blocks.0.resnets.0.conv1.input_quantizer"
    calibration = calibration_set()
    for step in (0, 3):
        indices = (calibration.step_indices == step).nonzero().flatten()

        def values_of(selection: torch.Tensor) -> torch.Tensor:
            return inputs_of(model, {name}, lambda m: m(calibration.samples[selection], calibration.timesteps[selection]))[name]

        if momentum is None:
            values = values_of(indices)
            low, high = values.min(), values.max()
        else:
            values = values_of(indices[[0, 2, 3, 5]])  # 4 of the step's 6 samples, evenly spaced
            low, high = values.min(), values.max()
            for batch in indices.split(batch_size):
                values = values_of(batch)
                low = momentum * low + (1 - momentum) * values.min()
                high = momentum * high + (1 - momentum) * values.max()
        scale, zero_point = range_to_scale_zero_point(low, high, 8)
        quantizer = model.get_submodule(name)
        assert torch.allclose(quantizer.table_scale[step], scale, rtol=1e-6)
        assert quantizer.table_zero_point[step] == zero_point


def test_the_row_follows_the_timestep_of_the_call(temporal_model: nn.Module) -> None:
    name = "mid_block.resnets.0.time_emb_proj.input_quantizer"
    calls = [10, torch.tensor(900), torch.tensor([400, 400]), torch.tensor(150.0), 700]
    assert rows_seen_during_calls(temporal_model, name, calls) == [4, 0, 2, 3, 1]
    # between calls no row is in use: a direct call of a tabled layer cannot pick a stale one
    step_rows = timestep_tables(temporal_model).step_rows
    assert step_rows.rows is None
    assert all(quantizer.step_rows is step_rows for _, quantizer in table_quantizers(temporal_model))
    with pytest.raises(RuntimeError, match="no timestep selected"):
        temporal_model.get_submodule(name)(torch.ones(1, 16))


def test_the_call_quantizes_with_the_row_of_its_timestep(temporal_model: nn.Module) -> None:
    quantizer = temporal_model.get_submodule("up_blocks.1.resnets.0.time_emb_proj.input_quantizer")
    captured = {}
    handle = quantizer.register_forward_hook(lambda _m, args, output: captured.update(x=args[0], y=output))
    with torch.no_grad():
        temporal_model(sample=torch.zeros(1, 3, 8, 8), timestep=torch.tensor([150]))
    handle.remove()
    scale, zero_point = quantizer.table_scale[3], quantizer.table_zero_point[3]
    expected = (torch.clamp(torch.round(captured["x"] / scale) + zero_point, 0, 255) - zero_point) * scale
    assert torch.equal(captured["y"], expected)


@pytest.mark.parametrize("timestep", [401, torch.tensor([11]), 899.5, -1])
def test_a_timestep_outside_the_schedule_is_an_error(temporal_model: nn.Module, timestep: object) -> None:
    with pytest.raises(ValueError, match=r"timestep .* is not one of the 5 timesteps .*\(10\.\.900\)"):
        temporal_model(torch.zeros(1, 3, 8, 8), timestep)
    assert timestep_tables(temporal_model).step_rows.rows is None  # restored even after the error


def test_a_batch_mixing_timesteps_is_an_error(temporal_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="share one timestep.*2 different ones"):
        temporal_model(torch.zeros(2, 3, 8, 8), torch.tensor([900, 10]))


def test_a_deep_copy_selects_rows_of_its_own_quantizers(temporal_model: nn.Module) -> None:
    duplicate = copy.deepcopy(temporal_model)
    name = "down_blocks.1.resnets.0.time_emb_proj.input_quantizer"
    original_rows = []
    handle = temporal_model.get_submodule(name).register_forward_pre_hook(
        lambda module, _args: original_rows.append(module.step_rows.rows))
    assert rows_seen_during_calls(duplicate, name, [400]) == [2]
    handle.remove()
    assert original_rows == []


def test_temporal_features_by_timestep_match_those_inside_the_unet_call(temporal_model: nn.Module) -> None:
    timesteps = torch.tensor([10, 900, 400])  # one each: the UNet calls below have batch 1 too
    with torch.no_grad():
        features = temporal_features_by_timestep(temporal_model, timesteps)
    for position, timestep in enumerate(timesteps.tolist()):
        captured = {}
        handles = [temporal_model.get_submodule(name).register_forward_hook(
            lambda _m, _a, output, name=name: captured.__setitem__(name, output)) for name in EXPECTED_FEATURES]
        with torch.no_grad():
            temporal_model(torch.zeros(1, 3, 8, 8), timestep)
        for handle in handles:
            handle.remove()
        for name in EXPECTED_FEATURES:
            assert torch.equal(features[name][position], captured[name][0]), (name, timestep)
    with selected_timestep(temporal_model, 400) as row:
        assert row == 2
        assert int(timestep_tables(temporal_model).step_rows.rows) == 2
    assert timestep_tables(temporal_model).step_rows.rows is None


def test_tib_only_calibration_equals_calibration_through_the_whole_unet() -> None:
    through_tib = with_tables("temporal")
    through_unet = with_tables("temporal", through_unet=True)
    for name, quantizer in table_quantizers(through_tib):
        other = through_unet.get_submodule(name)
        assert torch.equal(quantizer.table_scale, other.table_scale), name
        assert torch.equal(quantizer.table_zero_point, other.table_zero_point), name


@pytest.mark.parametrize("scope", ["temporal", "all"])
def test_save_and_load_keep_the_tables_and_the_outputs(
    scope: str, temporal_model: nn.Module, all_model: nn.Module, tmp_path: Path
) -> None:
    model = temporal_model if scope == "temporal" else all_model
    save_quantized(model, tmp_path / "checkpoint")
    tables = json.loads((tmp_path / "checkpoint" / METADATA_FILE).read_text())["manifest"]["timestep_tables"]
    assert tables["schedule"] == SCHEDULE.tolist() and tables["scope"] == scope
    assert tables["quantizers"] == [name for name, _ in table_quantizers(model)]
    loaded = load_quantized(tmp_path / "checkpoint", pixel_unet())
    assert timestep_tables(loaded).scope == scope
    assert torch.equal(timestep_tables(loaded).schedule, SCHEDULE)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    table_keys = [key for key in saved_state if ".table_" in key]
    assert len(table_keys) == 3 * len(list(table_quantizers(model)))
    for key in table_keys:
        assert torch.equal(saved_state[key], loaded_state[key]), key
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for timestep in SCHEDULE.tolist():
            assert torch.equal(model(sample, timestep).sample, loaded(sample, timestep).sample), timestep
    with pytest.raises(ValueError, match="timestep 500"):
        loaded(sample, 500)


def test_the_manifest_not_the_config_rebuilds_the_tables(temporal_model: nn.Module, tmp_path: Path) -> None:
    """The config explains a model; what it holds is read from the model: a config that declares no tables
    (FSC done by hand afterwards) still saves and loads the tables the model carries."""
    model = copy.deepcopy(temporal_model)
    model.tfmq_info = Provenance.of(RTNConfig(**FAST), pixel_unet())
    loaded = load_quantized(save_quantized(model, tmp_path / "checkpoint"), pixel_unet())
    assert timestep_tables(loaded).scope == "temporal"
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(sample, int(SCHEDULE[3])).sample, loaded(sample, int(SCHEDULE[3])).sample)


def test_the_calibration_must_be_labelled_with_the_schedule() -> None:
    model = wrapped("temporal")
    mislabelled = calibration_set()
    mislabelled.timesteps = mislabelled.timesteps.flip(0)
    with pytest.raises(ValueError, match="actual timestep array"):
        calibrate_timestep_tables(model, mislabelled, "temporal", progress=False)
    with pytest.raises(ValueError, match=r"no samples of 1 scheduled step\(s\): 2 \(t=400\)"):
        calibrate_timestep_tables(model, calibration_set().at_steps([0, 1, 3, 4]), "temporal", progress=False)
    assert timestep_tables(model) is None  # refused before anything was attached


def test_tables_are_attached_once_for_one_schedule_and_scope() -> None:
    model = with_tables("temporal")
    with pytest.raises(ValueError, match="already carries timestep tables"):
        attach_timestep_tables(model, SCHEDULE, "temporal")
    with pytest.raises(ValueError, match="another schedule or scope"):
        calibrate_timestep_tables(model, calibration_set(), "all", progress=False)
    with pytest.raises(ValueError, match="repeats a timestep"):
        attach_timestep_tables(wrapped("temporal"), [900, 400, 400], "temporal")


def test_a_class_conditional_model_calibrates_with_the_labels_of_its_calibration_set() -> None:
    config = RTNConfig(**FAST, fsc_scope="temporal")
    model = quantize_model(class_unet(), config)
    calibration = calibration_set()
    labels = torch.arange(len(calibration)) % 10
    with pytest.raises(ValueError, match="class-conditional: the calibration set needs class_labels"):
        calibrate_timestep_tables(model, calibration, "temporal", progress=False)
    calibration.conditions["class_labels"] = labels
    set_quant_state(model, weight=True, act=False)  # the shared ranges are not calibrated here
    calibrate_timestep_tables(model, calibration, "temporal", progress=False, momentum=None)
    # every class label of the step is covered: the rows hold the range over all of them
    quantizer = model.get_submodule("mid_block.resnets.1.time_emb_proj.input_quantizer")
    step = (calibration.step_indices == 1).nonzero().flatten()
    values = inputs_of(model, {"mid_block.resnets.1.time_emb_proj.input_quantizer"},
                       lambda m: find_tib(m).temporal_features(calibration.timesteps[step], labels[step]))
    expected_scale, _ = range_to_scale_zero_point(*(lambda v: (v.min(), v.max()))(next(iter(values.values()))), 8)
    assert torch.equal(quantizer.table_scale[1], expected_scale)


def test_quantizer_tables_stay_out_of_the_state_of_quantizers_without_them() -> None:
    model = wrapped("temporal")
    keys_before = set(model.state_dict())
    assert not any(".table_" in key for key in keys_before)
    attach_timestep_tables(model, SCHEDULE, "temporal")
    added = set(model.state_dict()) - keys_before
    assert added == {"timestep_tables.schedule"} | {
        f"{name}.{buffer}" for name in TEMPORAL_QUANTIZERS
        for buffer in ("table_scale", "table_zero_point", "table_initialized")}
    assert all(not quantizer.has_timestep_table for name, quantizer in quantizers(model) if name not in TEMPORAL_QUANTIZERS)


def test_config_fields_round_trip_and_are_checked() -> None:
    config = TFMQConfig(fsc_scope="all", fsc_momentum=None, fsc_init_samples=32)
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert (RTNConfig().fsc_scope, RTNConfig().fsc_momentum, RTNConfig().fsc_init_samples) == ("none", 0.95, 16)
    for field, value in [("fsc_scope", "some"), ("fsc_momentum", 1.0), ("fsc_momentum", -0.1),
                         ("fsc_momentum", True), ("fsc_init_samples", 0), ("fsc_init_samples", 2.0)]:
        with pytest.raises(ValueError, match=field) as error:
            RTNConfig(**{field: value})
        assert repr(value) in str(error.value)
    with pytest.raises(ValueError, match="a_bits is None"):
        RTNConfig(a_bits=None, fsc_scope="temporal")


# ----------------------------------------------------------------------------------------------------
# Schedule-free tables: a row per training timestep, the uncalibrated ones filled from the calibrated ones

TRAINING_STEPS = 1000


def schedule_free(scope: str, fill: str = "linear") -> nn.Module:
    model = wrapped(scope)
    calibrate_timestep_tables(model, calibration_set(), scope, momentum=None, table_schedule=training_schedule(
        TRAINING_STEPS), fill=fill, progress=False)
    return model


@pytest.fixture(scope="module")
def schedule_free_temporal() -> nn.Module:
    with one_thread():
        return schedule_free("temporal")


def test_schedule_free_tables_keep_the_calibrated_rows_and_fill_every_other(
    schedule_free_temporal: nn.Module, temporal_model: nn.Module
) -> None:
    tables = timestep_tables(schedule_free_temporal)
    assert tables.schedule_free and torch.equal(tables.schedule, torch.arange(TRAINING_STEPS))
    bound = dict(table_quantizers(temporal_model))
    for name, quantizer in table_quantizers(schedule_free_temporal):
        assert len(quantizer.table_scale) == TRAINING_STEPS and bool(quantizer.table_initialized.all())
        # row t of the schedule-free table is row (position of t) of the schedule-bound one, bit for bit
        assert torch.equal(quantizer.table_scale[SCHEDULE], bound[name].table_scale), name
        assert torch.equal(quantizer.table_zero_point[SCHEDULE], bound[name].table_zero_point), name
    inputs = {"sample": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        for timestep in SCHEDULE.tolist():
            assert torch.equal(schedule_free_temporal(timestep=timestep, **inputs).sample,
                               temporal_model(timestep=timestep, **inputs).sample)


@pytest.mark.parametrize("fill", ["linear", "nearest"])
def test_uncalibrated_rows_interpolate_or_copy_their_calibrated_neighbours(fill: str) -> None:
    quantizer = dict(table_quantizers(schedule_free("temporal", fill)))["mid_block.resnets.0.time_emb_proj.input_quantizer"]
    low, high = quantizer.table_ranges()
    # beyond the calibrated timesteps (10..900): the edge row's range
    assert torch.allclose(low[:10], low[10].expand(10)) and torch.allclose(high[901:], high[900].expand(99))
    for t in (11, 150 + 100, 399, 650, 700 + 73):
        left, right = max(s for s in SCHEDULE.tolist() if s <= t), min(s for s in SCHEDULE.tolist() if s >= t)
        weight = (t - left) / (right - left)
        if fill == "nearest":
            weight = float(weight > 0.5)
        expected = range_to_scale_zero_point(torch.lerp(low[left], low[right], weight),
                                             torch.lerp(high[left], high[right], weight), 8)
        assert torch.allclose(quantizer.table_scale[t], expected[0]), (fill, t)
        assert torch.equal(quantizer.table_zero_point[t], expected[1]), (fill, t)


@pytest.mark.parametrize("timestep, row", [(37, 37), (torch.tensor([512.4, 512.4]), 512), (999, 999), (0.4, 0)])
def test_a_schedule_free_model_serves_any_timestep_of_its_training_range(
    schedule_free_temporal: nn.Module, timestep: object, row: int
) -> None:
    name = "mid_block.resnets.0.time_emb_proj.input_quantizer"
    assert rows_seen_during_calls(schedule_free_temporal, name, [timestep]) == [row]


@pytest.mark.parametrize("timestep", [1000, -1, torch.tensor([1200.0])])
def test_a_timestep_outside_the_training_range_is_an_error(schedule_free_temporal: nn.Module, timestep: object) -> None:
    with pytest.raises(ValueError, match=r"outside the model's training range 0\.\.999"):
        schedule_free_temporal(torch.zeros(1, 3, 8, 8), timestep)
    with pytest.raises(ValueError, match="share one timestep"):
        schedule_free_temporal(torch.zeros(2, 3, 8, 8), torch.tensor([900, 10]))


def test_schedule_free_tables_save_load_and_answer_identically(schedule_free_temporal: nn.Module,
                                                               tmp_path: Path) -> None:
    reloaded = load_quantized(save_quantized(schedule_free_temporal, tmp_path / "q"), pixel_unet())
    assert timestep_tables(reloaded).schedule_free
    inputs = {"sample": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        for timestep in (3, 451, 998.7):
            assert torch.equal(reloaded(timestep=timestep, **inputs).sample,
                               schedule_free_temporal(timestep=timestep, **inputs).sample)


def test_tables_of_another_schedule_than_the_calibrations_must_be_schedule_free() -> None:
    with pytest.raises(ValueError, match="must be schedule-free"):
        calibrate_timestep_tables(wrapped("temporal"), calibration_set(), "temporal",
                                  table_schedule=torch.tensor([900, 700, 400, 150, 10, 5]), progress=False)
    with pytest.raises(ValueError, match="outside the model's training range 0..99"):
        calibrate_timestep_tables(wrapped("temporal"), calibration_set(), "temporal",
                                  table_schedule=training_schedule(100), progress=False)


def test_the_timesteps_a_sampler_visits_are_checked_before_sampling(schedule_free_temporal: nn.Module,
                                                                    temporal_model: nn.Module) -> None:
    timestep_tables(schedule_free_temporal).check_serves([999, 512.4, 0])
    with pytest.raises(ValueError, match=r"1 timestep\(s\) outside the model's training range 0\.\.999 \(1000\)"):
        timestep_tables(schedule_free_temporal).check_serves([999, 1000])
    timestep_tables(temporal_model).check_serves(SCHEDULE.tolist())
    with pytest.raises(ValueError, match=r"2 timestep\(s\) that are not among the 5 .* \(11, 899\): .*--schedule-free"):
        timestep_tables(temporal_model).check_serves([900, 899, 11])
