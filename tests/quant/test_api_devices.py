"""The quantize path on any device and in half precision: the device-cleanliness check (see
tests/device_tracking.py) for every method, no host read on a UNet call, and float16 / bfloat16 models."""

import json

import pytest
import torch
from tests.device_tracking import tensors_stay_on_cpu
from tests.quant.tiny_unets import one_thread, pixel_unet, unet_inputs
from torch.overrides import TorchFunctionMode

from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import METADATA_FILE, load_quantized, save_quantized
from tfmq.quant.config import QDiffusionConfig, RTNConfig, TFMQConfig
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.sampling import SamplerConfig, sample

SAMPLER = SamplerConfig(steps=4)
FEW_ITERATIONS = {"recon_weight_iters": 2, "recon_act_iters": 2}
CONFIGS = {
    "rtn": RTNConfig(),
    "qdiff": QDiffusionConfig(**FEW_ITERATIONS),
    "tfmq-cache-fsc": TFMQConfig(**FEW_ITERATIONS, temporal_cache=True, fsc_scope="all"),
    "tfmq-schedule-free": TFMQConfig(**FEW_ITERATIONS, temporal_cache=True, fsc_scope="all", train_timesteps=1000),
}


@pytest.fixture(scope="module")
def calibration():
    with one_thread():
        return collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 4, SAMPLER, 2, progress=False)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_tensor_of_calibration_quantize_save_load_and_sample_is_made_where_the_model_is(
        name, calibration, tmp_path):
    base, scheduler = pixel_unet(), fashion_ddpm_scheduler()  # diffusers' own tensors, made outside the check
    with tensors_stay_on_cpu() as offenders:
        fresh = collect_calibration(base, scheduler, 2, SAMPLER, 2, progress=False)
        model = quantize(base, CONFIGS[name], calibration, progress=False)
        loaded = load_quantized(save_quantized(model, tmp_path / name), base)
        images = sample(loaded, scheduler, 2, 0, SAMPLER, progress=False)
    assert offenders == {}
    assert len(fresh) == 2 * len(calibration.schedule) and images.shape == (2, 3, 8, 8)


class _HostReads(TorchFunctionMode):
    """Counts the calls that make the host wait for a tensor's value."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_call_of_a_model_with_step_tables_and_caches_reads_nothing_back_to_the_host(calibration):
    model = quantize(pixel_unet(), CONFIGS["tfmq-cache-fsc"], calibration, progress=False)
    inputs = unet_inputs(model, 2, 0)
    timestep = calibration.schedule[1].repeat(2)
    with torch.no_grad():
        model(inputs["sample"], timestep)  # the first call may read each quantizer's flags once
        with _HostReads() as counter:
            model(inputs["sample"], timestep)
    assert counter.reads == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_unet_quantizes_saves_loads_and_samples_in_its_dtype(dtype, tmp_path):
    base = pixel_unet().to(dtype)
    scheduler = fashion_ddpm_scheduler()
    calibration = collect_calibration(base, scheduler, 4, SAMPLER, 2, progress=False)
    assert calibration.samples.dtype == dtype  # recorded as the UNet saw them
    model = quantize(base, CONFIGS["tfmq-cache-fsc"], calibration, progress=False)
    layer = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert layer.weight.dtype == dtype and layer.weight_quantizer.scale.dtype == torch.float32
    assert all(q.scale.dtype == torch.float32 for q in model.modules() if isinstance(q, UniformQuantizer))
    folder = save_quantized(model, tmp_path / "half")
    recorded = json.loads((folder / METADATA_FILE).read_text())["provenance"]["base_model"]
    assert recorded["dtype"] == str(dtype).removeprefix("torch.")
    loaded = load_quantized(folder, base)
    images = sample(loaded, scheduler, 3, 0, SAMPLER, progress=False)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, sample(model, scheduler, 3, 0, SAMPLER, progress=False))
    reference = sample(base, scheduler, 3, 0, SAMPLER, progress=False)
    full = sample(pixel_unet(), scheduler, 3, 0, SAMPLER, progress=False)
    # W4A8 in half precision stays about as far from its FP model as the float32 FP model is from it, or closer
    assert (images - reference).pow(2).mean() < 0.5 * reference.pow(2).mean()
    assert (reference - full).abs().mean() < 0.05  # the half-precision FP model is still the float32 one
