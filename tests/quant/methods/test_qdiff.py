from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from tests.quant.methods.helpers import calibrated, input_batches, unit_outputs
from tests.quant.tiny_unets import one_thread, pixel_unet, text_unet
from tfmq.quant.config import QDiffusionConfig, RTNConfig
from tfmq.quant.wrap import quant_layers
from tfmq.quant.api import quantize
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.methods.qdiff import reconstruct_qdiff
from tfmq.quant.methods.units import unet_units
from tfmq.quant.provenance import Provenance

STEPS = 40


def calibration_set(unet: UNet2DModel, per_step: int, seed: int) -> CalibrationSet:
    """Stand-in trajectories: noise at every step of a 40-step schedule, interval_length 2."""
    generator = torch.Generator().manual_seed(seed)
    schedule = torch.arange(STEPS - 1, -1, -1) * 25
    step_indices = torch.arange(STEPS).repeat_interleave(per_step)
    samples = torch.randn(len(step_indices), unet.config.in_channels, 8, 8, generator=generator)
    return CalibrationSet(samples, schedule[step_indices], step_indices, schedule, interval_length=2)


@pytest.fixture(scope="module")
def pixel_models() -> dict[str, nn.Module]:
    """A tiny UNet, quantized W3A8 by RTN and by qdiff (fast preset) on the same calibration data."""
    unet = pixel_unet()
    calibration = calibration_set(unet, per_step=4, seed=0)
    models = {"fp": unet, "calibration": calibration}
    with one_thread():
        for method, config in (("rtn", RTNConfig(w_bits=3, a_bits=8)), ("qdiff", QDiffusionConfig(w_bits=3, a_bits=8))):
            models[method] = quantize(unet, config, calibration, progress=False)
    return models


def test_qdiff_reconstructs_every_unit_on_the_weight_steps(pixel_models: dict) -> None:
    records = pixel_models["qdiff"].tfmq_info.method_results["reconstruction"]
    calibration = pixel_models["calibration"]
    names = [unit.name for unit in unet_units(pixel_models["qdiff"], pixel_models["fp"], {
        "sample": calibration.samples[:1], "timestep": calibration.timesteps[:1]})]
    assert [record["name"] for record in records] == names
    weight_samples = len(calibration.for_weights())
    assert weight_samples == len(calibration) // 2  # every second sampling step
    assert all(record["samples"] == weight_samples for record in records)


def test_every_unit_ends_closer_to_full_precision_than_round_to_nearest(pixel_models: dict) -> None:
    unet, rtn, qdiff = pixel_models["fp"], pixel_models["rtn"], pixel_models["qdiff"]
    held_out = calibration_set(unet, per_step=2, seed=1)
    batches = held_out.batches(40)
    names = [record["name"] for record in qdiff.tfmq_info.method_results["reconstruction"]]
    reference = unit_outputs(unet, names, batches)
    errors = {
        method: {name: (output - reference[name]).pow(2).mean().item()
                 for name, output in unit_outputs(model, names, batches).items()}
        for method, model in (("rtn", rtn), ("qdiff", qdiff))
    }
    worse = {name: (errors["qdiff"][name], errors["rtn"][name]) for name in names
             if errors["qdiff"][name] >= errors["rtn"][name]}
    assert not worse
    final_rtn = (rtn(**batches[0]).sample - unet(**batches[0]).sample).pow(2).mean()
    final_qdiff = (qdiff(**batches[0]).sample - unet(**batches[0]).sample).pow(2).mean()
    assert final_qdiff < 0.8 * final_rtn


def test_qdiff_checkpoint_reloads_with_identical_outputs(pixel_models: dict, tmp_path) -> None:
    unet, qdiff, rtn = pixel_models["fp"], pixel_models["qdiff"], pixel_models["rtn"]
    path = save_quantized(qdiff, tmp_path / "qdiff")
    reloaded = load_quantized(path, unet)
    assert reloaded.tfmq_info.config == qdiff.tfmq_info.config
    inputs = {"sample": torch.randn(3, 3, 8, 8), "timestep": torch.tensor([5, 500, 950])}
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, qdiff(**inputs).sample)
    # The checkpoint holds the learnt rounding: codes that round-to-nearest would not choose.
    learnt = dict(quant_layers(reloaded))["mid_block.resnets.0.conv1"]
    nearest = dict(quant_layers(rtn))["mid_block.resnets.0.conv1"]
    assert not torch.equal(learnt.weight_quantizer.integer_values(learnt.weight),
                           nearest.weight_quantizer.integer_values(nearest.weight))


def test_qdiff_on_a_text_conditioned_unet_saves_and_reloads(tmp_path) -> None:
    unet = text_unet()
    batches = input_batches(unet, 2, 16, seed=0)  # keyword inputs with encoder_hidden_states
    config = QDiffusionConfig(w_bits=4, a_bits=8, recon_preset="fast", recon_weight_iters=40, recon_act_iters=10, recon_batch_size=16)
    model = calibrated(unet, config, batches)
    results = reconstruct_qdiff(model, unet, batches, config, progress=False)
    assert "down_blocks.0.attentions.0" in [result.name for result in results]
    assert sum(result.mse_after for result in results) < sum(result.mse_before for result in results)

    model.tfmq_info = Provenance.of(config, unet)
    reloaded = load_quantized(save_quantized(model, tmp_path / "text"), unet)
    held_out = input_batches(unet, 1, 2, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(**held_out).sample, model.eval()(**held_out).sample)
