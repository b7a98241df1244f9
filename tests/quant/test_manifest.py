"""The manifest: what a quantized model is made of, and the model rebuilt from it alone."""

from __future__ import annotations

import json

import pytest
import torch

from tests.quant.tiny_unets import one_thread, pixel_unet, unet_inputs
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import LayerRule, RTNConfig, TFMQConfig
from tfmq.quant.manifest import ModelManifest
from tfmq.quant.nn.step_table import StepTable
from tfmq.sampling import SamplerConfig


@pytest.fixture(scope="module")
def calibration():
    with one_thread():
        return collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 3, SamplerConfig(steps=6), 2, progress=False)


@pytest.fixture(scope="module")
def cached_model(calibration):
    config = TFMQConfig(w_bits=4, a_bits=8, recon_preset="fast", recon_weight_iters=2, recon_act_iters=1,
                        temporal_cache=True,
                        layers=(LayerRule.full_precision("conv_in"), LayerRule("conv_out", w_bits=8)))
    with one_thread():
        return quantize(pixel_unet(), config, calibration, progress=False)


def test_it_records_every_quantized_module_with_its_bits(cached_model) -> None:
    manifest = ModelManifest.of(cached_model)
    layers = manifest.plan.layers
    assert "conv_in" not in layers and layers["conv_out"].w_bits == 8 and layers["conv_out"].a_bits == 8
    assert layers["down_blocks.0.resnets.0.conv1"].w_bits == 4
    assert any(plan.split is not None for plan in layers.values())  # the up-blocks' shortcut splits
    assert manifest.plan.attentions and all(plan.a_bits == 8 for plan in manifest.plan.attentions.values())
    tables, caches = manifest.timestep_tables, manifest.temporal_caches
    assert tables.scope == "temporal" and len(tables.schedule) == 6 and tables.quantizers
    assert caches.code_dtype == "uint8" and caches.time_embedding_skipped
    assert all(isinstance(cached_model.get_submodule(f"{block}.time_emb_proj"), StepTable) for block in caches.blocks)


def test_it_round_trips_through_json_and_rebuilds_a_model_that_takes_the_state_exactly(cached_model) -> None:
    manifest = ModelManifest.of(cached_model)
    assert ModelManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    rebuilt = manifest.build(pixel_unet())
    rebuilt.load_state_dict(cached_model.state_dict(), strict=True)
    assert ModelManifest.of(rebuilt) == manifest
    inputs = unet_inputs(pixel_unet(), 2, seed=1)
    timestep = int(manifest.timestep_tables.schedule[2])
    with torch.no_grad():
        assert torch.equal(rebuilt(**{**inputs, "timestep": timestep}).sample,
                           cached_model(**{**inputs, "timestep": timestep}).sample)


def test_a_plain_model_has_no_tables_and_an_unknown_layer_is_refused(calibration) -> None:
    with one_thread():
        model = quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=None), calibration, progress=False)
    manifest = ModelManifest.of(model)
    assert manifest.timestep_tables is None and manifest.temporal_caches is None
    assert all(plan.a_bits is None for plan in manifest.plan.layers.values())
    values = manifest.to_dict()
    values["layers"]["mid_block.no_such_conv"] = {"w_bits": 8, "a_bits": None, "split": None}
    with pytest.raises(ValueError, match="mid_block.no_such_conv is no module of UNet2DModel"):
        ModelManifest.from_dict(values).build(pixel_unet())


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda values: values.pop("attentions"), "manifest must be an object of"),
    (lambda values: values["layers"].update(conv_out={"w_bits": "4", "a_bits": 8, "split": None}),
     "bit widths must be ints or null"),
    (lambda values: values.update(timestep_tables={"schedule": [], "scope": "temporal", "quantizers": []}),
     "schedule must be a non-empty list of ints"),
    (lambda values: values.update(timestep_tables={"schedule": [1], "scope": "some", "quantizers": []}),
     "scope must be one of"),
    (lambda values: values.update(temporal_caches={"blocks": ["a"], "code_dtype": "int4",
                                                   "time_embedding_skipped": False}), "code_dtype must be one of"),
    (lambda values: values.update(output_correction={"channels": 0}), "channels must be a positive int"),
    (lambda values: values.update(output_correction={"channels": 3, "steps": 6}),
     "output_correction must be an object of channels"),
    (lambda values: values.update(extra=None), "manifest must be an object of"),
])
def test_bad_entries_are_refused_naming_them(calibration, edit, problem) -> None:
    with one_thread():
        model = quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=8), calibration, progress=False)
    values = ModelManifest.of(model).to_dict()
    edit(values)
    with pytest.raises(ValueError, match=problem):
        ModelManifest.from_dict(values)


def test_a_manifest_written_before_output_corrections_loads_as_one_without(calibration) -> None:
    with one_thread():
        model = quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=8, output_correction=True), calibration,
                         progress=False)
    manifest = ModelManifest.of(model)
    values = manifest.to_dict()
    assert values["output_correction"] == {"channels": 3} and ModelManifest.from_dict(values) == manifest
    assert manifest.timestep_tables.scope == "none"  # the schedule came with the correction alone
    rebuilt = manifest.build(pixel_unet())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    del values["output_correction"]
    assert ModelManifest.from_dict(values).output_correction is None
