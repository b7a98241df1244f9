import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from tests.quant.tiny_unets import pixel_unet, unet_inputs
from torch import nn

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.config import QDiffusionConfig, RTNConfig
from tfmq.sampling import SamplerConfig


@pytest.fixture(scope="module")
def calibration():
    return collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 4, SamplerConfig(steps=8), 2, progress=False)


def _relative_error(model, base, seed: int = 9) -> float:
    inputs = unet_inputs(base, 4, seed)
    inputs["timestep"] = torch.tensor([0, 80, 400, 800])  # on the calibrated trajectory's timesteps range
    with torch.no_grad():
        reference = base(**inputs).sample
        return float((model(**inputs).sample - reference).norm() / reference.norm())


def test_rtn_w8a8_stays_close_and_w4a8_is_further(calibration):
    base = pixel_unet()
    w8a8 = _relative_error(quantize(base, RTNConfig(w_bits=8, a_bits=8), calibration,
                                    progress=False), base)
    w4a8 = _relative_error(quantize(base, RTNConfig(w_bits=4, a_bits=8), calibration,
                                    progress=False), base)
    assert w8a8 < 0.05  # the bound stated in the README for W8A8 RTN on random tiny UNets
    assert w8a8 < w4a8


@pytest.mark.parametrize("config", [RTNConfig(), QDiffusionConfig(recon_weight_iters=2, recon_act_iters=1)],
                         ids=["rtn", "qdiff"])
def test_base_model_is_left_in_full_precision(calibration, config):
    base = pixel_unet()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    quantized = quantize(base, config, calibration, progress=False)
    assert all(torch.equal(before[name], tensor) for name, tensor in base.state_dict().items())
    # The twin holds storage of its own only for the weights reconstruction changed.
    base_storage = {tensor.data_ptr() for tensor in base.state_dict().values()}
    shared = [name for name, tensor in quantized.state_dict().items() if tensor.data_ptr() in base_storage]
    changed = [name for name, tensor in quantized.state_dict().items()
               if name in before and not torch.equal(tensor, before[name])]
    assert bool(changed) == isinstance(config, QDiffusionConfig) and shared  # hardened weights are on the grid
    assert not set(shared) & set(changed)
    assert len(shared) + len(changed) == len(before)


def test_quantized_unet_runs_inside_a_diffusers_pipeline(calibration):
    model = quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=8), calibration, progress=False)
    pipeline = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(fashion_ddpm_scheduler().config))
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1


def test_bad_input_is_a_clear_error(calibration):
    with pytest.raises(ValueError, match="w_bits"):
        RTNConfig(w_bits=1)
    with pytest.raises(ValueError, match="a_bits"):
        RTNConfig(a_bits=32)
    with pytest.raises(TfmqError, match="no Conv2d or Linear"):
        quantize(nn.Sequential(nn.ReLU()), RTNConfig(), calibration, progress=False)
    with pytest.raises(TfmqError, match="empty"):
        quantize(pixel_unet(), RTNConfig(), calibration.at_steps([]), progress=False)


def test_fsc_tables_come_with_every_method_and_are_saved(calibration, tmp_path):
    base = pixel_unet()
    model = quantize(base, RTNConfig(fsc_scope="temporal"), calibration, progress=False)
    assert torch.equal(model.timestep_tables.schedule, calibration.schedule)
    reloaded = load_quantized(save_quantized(model, tmp_path / "rtn"), base)
    inputs = unet_inputs(base, 2, 3)
    with torch.no_grad():
        step = int(calibration.schedule[3])
        assert torch.equal(reloaded(inputs["sample"], step).sample, model(inputs["sample"], step).sample)


@pytest.mark.parametrize(("scope", "act_iters"), [("temporal", 3), ("all", 0)])
def test_fsc_over_all_activations_skips_the_activation_step_learning_it_would_discard(calibration, scope, act_iters):
    config = QDiffusionConfig(fsc_scope=scope, recon_preset="fast", recon_weight_iters=2, recon_act_iters=3, recon_batch_size=4)
    model = quantize(pixel_unet(), config, calibration, progress=False)
    assert model.tfmq_info.method_results["reconstruction_settings"]["act_iters"] == act_iters
    assert model.tfmq_info.config.recon_act_iters == 3
