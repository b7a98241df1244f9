from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from tests.quant.methods.helpers import unit_outputs
from tests.quant.test_tib import EXPECTED_RESNETS, class_unet
from tests.quant.tiny_unets import one_thread, pixel_unet
from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.config import LayerRule, QDiffusionConfig, RTNConfig, TFMQConfig
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.wrap import quantize_model
from tfmq.quant.api import quantize
from tfmq.quant.calibration import CalibrationSet, collect_calibration
from tfmq.quant.checkpoint import METADATA_FILE, load_quantized, save_quantized
from tfmq.quant.activation_ranges import calibrate_activation_ranges
from tfmq.quant.methods.tfmq import (
    TIB_UNIT,
    block_units,
    cached_temporal_features,
    maintain_temporal_features,
    reconstruct_tib,
    temporal_cache_stats,
)
from tfmq.quant.methods.scheduled_lookup import (
    ScheduledFeatureLookup,
    restore_projections,
    serve_caches_for_reconstruction,
)
from tfmq.quant.nn.step_table import StepTable
from tfmq.quant.nn.temporal import SkippedTimestepEmbedding, temporal_features_by_timestep
from tfmq.quant.tib import find_tib
from tfmq.quant.timestep_table import table_quantizers
from tfmq.quant.provenance import Provenance
from tests.quant.test_checkpoint import assign, rewrite_metadata
from tfmq.sampling import SamplerConfig

STEPS = 20
FAST = dict(recon_preset="fast")
SHORT = dict(recon_preset="fast", recon_weight_iters=20, recon_act_iters=5)
FULL_PIPELINE = TFMQConfig(w_bits=4, a_bits=8, fsc_scope="temporal", temporal_cache=True, temporal_selection=True, **FAST)


@pytest.fixture(scope="module")
def calibration() -> CalibrationSet:
    """Real DDIM trajectories of the tiny UNet on the schedule diffusers' DDIMScheduler uses for 20 steps
    (uniform skipping = its default "leading" spacing), so the quantized UNet can run in DDIMPipeline."""
    with one_thread():
        return collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 4,
                                   SamplerConfig(steps=STEPS, skip_type="uniform"), interval_length=2, progress=False)


@pytest.fixture(scope="module")
def full_pipeline(calibration: CalibrationSet) -> nn.Module:
    """TIAR + block reconstruction + FSC (temporal) + cache + selection, W4A8, fast preset."""
    with one_thread():
        return quantize(pixel_unet(), FULL_PIPELINE, calibration, progress=False)


def timestep_errors(model: nn.Module, reference: dict[str, torch.Tensor], schedule: torch.Tensor) -> torch.Tensor:
    """Per scheduled timestep: the squared error of all temporal features, summed over blocks and channels."""
    features = temporal_features_by_timestep(model, schedule)
    return sum((features[name] - target).pow(2).sum(dim=1) for name, target in reference.items())


def test_tiar_lowers_the_temporal_feature_error_at_every_timestep(calibration: CalibrationSet) -> None:
    unet = pixel_unet()
    rtn = quantize(unet, RTNConfig(w_bits=3, a_bits=8), calibration, progress=False)
    tiar = copy.deepcopy(rtn)
    result = reconstruct_tib(tiar, unet, calibration.schedule, TFMQConfig(w_bits=3, a_bits=8, **FAST),
                             progress=False)
    assert (result.name, result.samples) == (TIB_UNIT, STEPS)  # every timestep of the schedule, once
    schedule = calibration.schedule
    with torch.no_grad():
        reference = find_tib(unet).temporal_features(schedule)
        rtn_errors, tiar_errors = timestep_errors(rtn, reference, schedule), timestep_errors(tiar, reference, schedule)
    assert bool((tiar_errors < rtn_errors).all()), (tiar_errors / rtn_errors).tolist()
    assert tiar_errors.sum() < 0.6 * rtn_errors.sum()
    # Only the TIB learnt: the blocks' weights are RTN's.
    tib_linears = set(find_tib(unet).linear_names)
    rtn_state, tiar_state = rtn.state_dict(), tiar.state_dict()
    changed = {name.rsplit(".", 1)[0] for name, tensor in tiar_state.items()
               if name.endswith(".weight") and not torch.equal(tensor, rtn_state[name])}
    assert changed and changed <= tib_linears


def test_block_units_leave_the_tib_to_tiar(calibration: CalibrationSet) -> None:
    unet = pixel_unet()
    model = quantize_model(unet, RTNConfig(w_bits=4, a_bits=8))
    example = {"sample": calibration.samples[:1], "timestep": calibration.timesteps[:1]}
    units = {unit.name: unit for unit in block_units(model, unet, example)}
    tib = find_tib(model)
    tib_layers = {id(model.get_submodule(name)) for name in tib.linear_names}
    tib_inputs = {id(model.get_submodule(name).input_quantizer) for name in tib.linear_names}
    assert not any(name.startswith("time_embedding") for name in units)
    assert set(EXPECTED_RESNETS) <= set(units)
    for unit in units.values():
        assert not tib_layers & {id(layer) for layer in unit.layers}
        assert not tib_inputs & {id(quantizer) for quantizer in unit.activation_quantizers}
    resnet = units["mid_block.resnets.0"]
    assert {id(resnet_layer) for resnet_layer in resnet.layers} == {
        id(model.get_submodule(f"mid_block.resnets.0.{part}")) for part in ("conv1", "conv2")}


def test_tfmq_records_tiar_then_the_blocks_and_calibrates_a_row_per_timestep(calibration: CalibrationSet) -> None:
    unet = pixel_unet()
    model = quantize(unet, TFMQConfig(w_bits=4, a_bits=8, fsc_scope="temporal", **SHORT),
                     calibration, progress=False)
    records = model.tfmq_info.method_results["reconstruction"]
    assert records[0]["name"] == TIB_UNIT and records[0]["samples"] == STEPS
    assert records[0]["mse_after"] < records[0]["mse_before"]
    names = [record["name"] for record in records[1:]]
    assert "down_blocks.0.resnets.0" in names and not any(name.startswith("time_embedding") for name in names)
    assert all(record["samples"] == len(calibration.for_weights()) for record in records[1:])
    assert torch.equal(model.timestep_tables.schedule, calibration.schedule)
    tabled = dict(table_quantizers(model))
    expected = {f"{name}.input_quantizer" for name in find_tib(model).feature_reader_names}
    assert set(tabled) == expected
    assert all(len(q.table_scale) == STEPS and bool(q.table_initialized.all()) for q in tabled.values())


def test_tiar_runs_its_own_steps_on_every_timestep_at_once(calibration: CalibrationSet) -> None:
    config = TFMQConfig(w_bits=4, a_bits=8, tiar_weight_iters=7, tiar_batch_size=1024, tiar_weight_lr=0.1, **SHORT)
    model = quantize(pixel_unet(), config, calibration, progress=False)
    tiar, *blocks = model.tfmq_info.method_results["reconstruction"]
    assert (tiar["name"], tiar["samples"], tiar["rounding_steps"]) == (TIB_UNIT, STEPS, 7)
    assert tiar["mse_after"] < tiar["mse_before"]
    assert {block["rounding_steps"] for block in blocks} == {20}  # the blocks keep the preset's steps


def test_tfmq_without_tiar_and_fsc_is_qdiff(calibration: CalibrationSet) -> None:
    unet = pixel_unet()
    qdiff = quantize(unet, QDiffusionConfig(w_bits=4, a_bits=8, **SHORT), calibration, progress=False)
    tfmq = quantize(unet, TFMQConfig(tiar=False, w_bits=4, a_bits=8, fsc_scope="none", **SHORT), calibration,
                    progress=False)
    assert tfmq.tfmq_info.method_results["reconstruction"][0]["name"] == "time_embedding.linear_1"  # a unit, as in qdiff
    inputs = {"sample": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5)),
              "timestep": torch.tensor([900, 450, 0])}
    with torch.no_grad():
        assert torch.equal(tfmq(**inputs).sample, qdiff(**inputs).sample)
    assert all(torch.equal(tensor, qdiff.state_dict()[name]) for name, tensor in tfmq.state_dict().items())


def test_cached_features_are_the_full_precision_ones_within_8_bit_error(full_pipeline: nn.Module,
                                                                       calibration: CalibrationSet) -> None:
    unet = pixel_unet()
    schedule = calibration.schedule
    with torch.no_grad():
        reference = find_tib(unet).temporal_features(schedule)
    names = list(reference)
    largest_error = 0.0
    for step, timestep in enumerate(schedule.tolist()):
        # What the blocks receive inside a whole UNet call at this timestep.
        received = unit_outputs(full_pipeline, names, [{"sample": torch.zeros(1, 3, 8, 8), "timestep": timestep}])
        for name in names:
            target = reference[name][step]
            low, high = min(target.min().item(), 0.0), max(target.max().item(), 0.0)
            half_step = (high - low) / 255 / 2
            error = (received[name][0] - target).abs().max().item()
            assert error <= half_step * 1.001 + 1e-7, (name, timestep, error, half_step)
            largest_error = max(largest_error, error / half_step)
    assert largest_error > 0.5  # quantized on an 8-bit grid, not a full-precision copy


def test_a_cached_forward_calls_no_tib_layer_and_equals_the_tib_computed_one(full_pipeline: nn.Module) -> None:
    model = full_pipeline
    assert isinstance(model.time_embedding, SkippedTimestepEmbedding)
    assert all(isinstance(model.get_submodule(f"{name}.time_emb_proj"), StepTable) for name in EXPECTED_RESNETS)
    inputs = {"sample": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), "timestep": 450}

    def tib_calls(unet: nn.Module) -> tuple[list[str], torch.Tensor]:
        """The TIB's parts that ran in one forward (the time MLP's layers, the blocks' projections)."""
        calls: list[str] = []
        handles = [module.register_forward_hook(lambda *_, name=name: calls.append(name))
                   for name, module in unet.named_modules()
                   if name.startswith("time_embedding.") or name.endswith("time_emb_proj")]
        try:
            with torch.no_grad():
                return calls, unet(**inputs).sample
        finally:
            for handle in handles:
                handle.remove()

    calls, cached = tib_calls(model)
    # Only the caches answer; the time MLP's layers do not run.
    assert sorted(calls) == sorted(f"{name}.time_emb_proj" for name in EXPECTED_RESNETS)
    # The skipped MLP changes nothing: let it compute for real and the output is the same.
    computing = copy.deepcopy(model)
    computing.time_embedding.forward = types.MethodType(TimestepEmbedding.forward, computing.time_embedding)
    computing_calls, computed = tib_calls(computing)
    assert "time_embedding.linear_2" in computing_calls
    assert torch.equal(computed, cached)


def test_a_timestep_outside_the_schedule_is_an_error(full_pipeline: nn.Module) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="not one of the 20 timesteps"):
        full_pipeline(torch.zeros(1, 3, 8, 8), 451)
    cache = full_pipeline.get_submodule("mid_block.resnets.0.time_emb_proj")
    with pytest.raises(RuntimeError, match="no timestep selected"):
        cache(torch.zeros(1, 32))


def test_full_pipeline_records_saves_loads_identically_and_samples_in_ddim_pipeline(
    full_pipeline: nn.Module, calibration: CalibrationSet, tmp_path: Path
) -> None:
    info = full_pipeline.tfmq_info.method_results
    assert info["temporal_cache"]["cached_blocks"] == [name for name, entry in info["temporal_selection"].items()
                                                      if entry["choice"] == "cache"]
    stats = temporal_cache_stats(full_pipeline)
    widths = sum(full_pipeline.get_submodule(f"{name}.time_emb_proj").out_features for name in EXPECTED_RESNETS)
    # 8-bit codes, and a float32 scale and zero point per timestep and block
    assert (stats.blocks, stats.steps, stats.values) == (len(EXPECTED_RESNETS), STEPS, STEPS * widths)
    assert stats.bytes == STEPS * widths + len(EXPECTED_RESNETS) * STEPS * 8
    assert full_pipeline.get_submodule("mid_block.resnets.0.time_emb_proj").codes.dtype == torch.uint8

    path = save_quantized(full_pipeline, tmp_path / "tfmq")
    assert json.loads((path / METADATA_FILE).read_text())["provenance"]["method_results"]["temporal_selection"] == \
        info["temporal_selection"]
    reloaded = load_quantized(path, pixel_unet())
    assert reloaded.state_dict().keys() == full_pipeline.state_dict().keys()
    assert isinstance(reloaded.time_embedding, SkippedTimestepEmbedding)
    inputs = {"sample": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        for timestep in (950, 500, 0):
            assert torch.equal(reloaded(timestep=timestep, **inputs).sample,
                               full_pipeline(timestep=timestep, **inputs).sample)

    # The tables know the calibration schedule only: the pipeline's scheduler must visit exactly it.
    scheduler = DDIMScheduler.from_config(fashion_ddpm_scheduler().config)
    scheduler.set_timesteps(STEPS)
    assert torch.equal(scheduler.timesteps, reloaded.timestep_tables.schedule)
    pipeline = DDIMPipeline(unet=reloaded, scheduler=scheduler)
    images = pipeline(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="not one of the 20 timesteps"):
        pipeline(batch_size=1, num_inference_steps=STEPS - 1, output_type="np")


def test_selection_keeps_per_block_the_path_with_the_lower_error(calibration: CalibrationSet, tmp_path: Path) -> None:
    """With one block's temporal path in full precision, only that block keeps the TIB path."""
    unet = pixel_unet()
    config = TFMQConfig(w_bits=4, a_bits=8, temporal_cache=True, temporal_selection=True, layers=tuple(map(LayerRule.full_precision, ("conv_in", "conv_out", "time_embedding", "mid_block.resnets.0.time_emb_proj"))), recon_preset="paper", fsc_scope="none")
    model = quantize_model(unet, config)
    calibrate_activation_ranges(model, calibration.per_step(4), 64, progress=False)
    schedule = calibration.schedule
    with torch.no_grad():
        reference = find_tib(unet).temporal_features(schedule)
        tib_path = temporal_features_by_timestep(model, schedule)
    extra = maintain_temporal_features(model, unet, schedule, config)
    with torch.no_grad():
        served = temporal_features_by_timestep(model, schedule)

    choices = {}
    for resnet in EXPECTED_RESNETS:
        name = f"{resnet}.time_emb_proj"
        tib_error = (tib_path[name] - reference[name]).pow(2).mean().item()
        served_error = (served[name] - reference[name]).pow(2).mean().item()
        cached = isinstance(model.get_submodule(name), StepTable)
        choices[resnet] = "cache" if cached else "tib"
        recorded = extra["temporal_selection"][resnet]
        assert recorded["choice"] == choices[resnet]
        assert recorded["tib_path_mse"] == pytest.approx(tib_error, rel=1e-5)
        assert served_error == pytest.approx(min(recorded["tib_path_mse"], recorded["cache_mse"]), rel=1e-4, abs=1e-12)
    assert choices["mid_block.resnets.0"] == "tib" and extra["temporal_selection"]["mid_block.resnets.0"][
        "tib_path_mse"] == 0.0
    assert sorted(choices.values()).count("cache") == len(EXPECTED_RESNETS) - 1
    assert not isinstance(model.time_embedding, SkippedTimestepEmbedding)  # one block still reads it

    model.tfmq_info = Provenance.of(config, unet, method_results=extra)
    reloaded = load_quantized(save_quantized(model, tmp_path / "selected"), unet)
    assert {resnet: "cache" if isinstance(reloaded.get_submodule(f"{resnet}.time_emb_proj"), StepTable)
            else "tib" for resnet in EXPECTED_RESNETS} == choices
    inputs = {"sample": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        for timestep in schedule[::7].tolist():
            assert torch.equal(reloaded(timestep=timestep, **inputs).sample, model(timestep=timestep, **inputs).sample)


def test_a_checkpoint_whose_manifest_lost_its_caches_is_refused(full_pipeline: nn.Module, tmp_path: Path) -> None:
    path = save_quantized(full_pipeline, tmp_path / "tfmq")
    blocks = json.loads((path / METADATA_FILE).read_text())["manifest"]["temporal_caches"]["blocks"]
    assert sorted(blocks) == sorted(full_pipeline.tfmq_info.method_results["temporal_cache"]["cached_blocks"])
    rewrite_metadata(path, assign("manifest.temporal_caches", None), resign=True)  # a forger's consistent edit
    with pytest.raises(TfmqError, match="does not match the model: missing .*unexpected .*time_emb_proj.codes"):
        load_quantized(path, pixel_unet())


def test_a_class_conditional_unet_has_no_temporal_cache(calibration: CalibrationSet) -> None:
    unet = class_unet()
    model = quantize_model(unet, RTNConfig(a_bits=None, weight_init="minmax"))
    config = TFMQConfig(a_bits=None, temporal_cache=True)
    with pytest.raises(ValueError, match="class-conditional"):
        maintain_temporal_features(model, unet, calibration.schedule, config)
    assert not any(isinstance(module, StepTable) for module in model.modules())


def test_tiar_respects_full_precision_layer_rules(calibration: CalibrationSet) -> None:
    unet = pixel_unet()
    config = TFMQConfig(w_bits=4, a_bits=None, weight_init="minmax", recon_preset="fast", recon_weight_iters=10,
                        layers=tuple(map(LayerRule.full_precision, ("conv_in", "conv_out", "time_embedding.linear_1"))))
    model = quantize_model(unet, config)
    before = model.time_embedding.linear_1.weight.clone()
    result = reconstruct_tib(model, unet, calibration.schedule, config, progress=False)
    assert result is not None
    assert not isinstance(model.time_embedding.linear_1, QuantLayer)
    assert torch.equal(model.time_embedding.linear_1.weight, before)
    everything_fp = TFMQConfig(w_bits=4, a_bits=None, weight_init="minmax", recon_preset="paper",
                               layers=tuple(map(LayerRule.full_precision,
                                                ("conv_in", "conv_out", "time_embedding", "*time_emb_proj"))))
    assert reconstruct_tib(quantize_model(unet, everything_fp), unet, calibration.schedule, everything_fp,
                           progress=False) is None


def test_blocks_read_the_cache_row_of_each_sample_during_reconstruction(calibration: CalibrationSet) -> None:
    model = quantize_model(pixel_unet(), TFMQConfig(w_bits=4, a_bits=None, recon_preset="paper", fsc_scope="none"))
    schedule = calibration.schedule
    caches = cached_temporal_features(pixel_unet(), schedule, 8)
    block = EXPECTED_RESNETS[0]
    original = model.get_submodule(block).time_emb_proj
    serve_caches_for_reconstruction(model, schedule, caches)
    lookup = model.get_submodule(block).time_emb_proj
    assert isinstance(lookup, ScheduledFeatureLookup)
    mixed = schedule[[3, 0, 3, 7]]  # one batch, several timesteps: what reconstruction feeds a block
    with torch.no_grad():
        embedding = find_tib(model).projection_inputs(mixed)[block]
        assert torch.equal(lookup(embedding), caches[block].values()[[3, 0, 3, 7]])
        with pytest.raises(ValueError, match="no scheduled timestep"):
            lookup(find_tib(model).projection_inputs(torch.tensor([int(schedule[0]) + 7]))[block])
    restore_projections(model)
    assert model.get_submodule(block).time_emb_proj is original


def test_the_quantized_pipeline_keeps_no_reconstruction_lookup(full_pipeline: nn.Module) -> None:
    assert not any(isinstance(module, ScheduledFeatureLookup) for module in full_pipeline.modules())
