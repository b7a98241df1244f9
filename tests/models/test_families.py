"""Every model family end to end on tiny random models: load, calibrate (both guidance branches),
quantize with each method, save, load, sample, and drop the quantized denoiser (UNet or DiT) into the
diffusers pipeline."""

from __future__ import annotations

import pytest
import torch
from tests.models.tiny_pipelines import FAMILIES, write_pipeline

from tfmq.models.loading import load_model
from tfmq.quant.api import quantize, relative_output_error
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.config import QuantConfig, config_for
from tfmq.sampling import SamplerConfig, sample, sampling_timesteps

PROMPTS = ["a photo of a sneaker", "a bag", "a coat on a black background"]
SAMPLER = SamplerConfig(name="plms", steps=5)
GUIDANCE = 2.0


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: write_pipeline(family, root / family) for family in FAMILIES}


def _conditioning(model, count: int, scale: float = GUIDANCE):
    if model.conditioning_kind is None:
        return None
    prompts = PROMPTS if model.conditioning_kind == "text" else None
    return model.conditioning(count, prompts=prompts, guidance_scale=scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layout_loads_with_its_parts(folders, family):
    model = load_model(folders[family])
    assert model.conditioning_kind == {"pixel": None, "latent": None, "class": "class", "text": "text",
                                       "dit": "class"}[family]
    assert (model.autoencoder is not None) == (family in ("latent", "text", "dit"))
    images = sample(model.unet, model.scheduler, 2, config=SAMPLER, progress=False,
                    conditioning=_conditioning(model, 2), decoder=model.decoder)
    size = 16 if model.autoencoder is not None else 8
    assert images.shape == (2, 1 if family != "class" else 3, size, size)


@pytest.mark.parametrize("family", ["class", "text", "dit"])
def test_guided_calibration_holds_both_branches_and_scale_one_only_the_conditional(folders, family):
    model = load_model(folders[family])
    key = "encoder_hidden_states" if family == "text" else "class_labels"
    unconditional = _conditioning(model, 3).unconditional[key]
    for scale, expected_unconditional in ((GUIDANCE, 3), (1.0, 0)):
        calibration = collect_calibration(model.unet, model.scheduler, 3, SAMPLER, 2, progress=False,
                                          conditioning=_conditioning(model, 3, scale))
        steps = len(sampling_timesteps(model.scheduler, SAMPLER))  # UNet calls: PLMS repeats one timestep
        assert len(calibration) == steps * (3 + expected_unconditional)
        rows = calibration.conditions[key].flatten(1) if family == "text" else calibration.conditions[key][:, None]
        is_unconditional = (rows == unconditional.flatten(1) if family == "text" else rows == unconditional).all(1)
        assert int(is_unconditional.sum()) == steps * expected_unconditional


def _w8a8(method: str, **reconstruction: int | str) -> QuantConfig:
    """W8A8 of `method`, with short reconstruction settings for the methods that reconstruct."""
    return config_for(method, {"w_bits": 8, "a_bits": 8, **(reconstruction if method != "rtn" else {})})


@pytest.mark.parametrize("method", ["rtn", "qdiff", "tfmq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_saves_loads_and_w8a8_stays_close(folders, tmp_path, family, method):
    model = load_model(folders[family])
    calibration = collect_calibration(model.unet, model.scheduler, 4, SAMPLER, 2, progress=False,
                                      conditioning=_conditioning(model, 4))
    config = _w8a8(method, recon_weight_iters=4, recon_act_iters=2)
    quantized = quantize(model.unet, config, calibration, source=model.source, progress=False)
    loaded = load_quantized(save_quantized(quantized, tmp_path / "q"), model.unet)
    run = {"config": SAMPLER, "progress": False, "seed": 5, "conditioning": _conditioning(model, 2),
           "decoder": model.decoder}
    images = sample(quantized, model.scheduler, 2, **run)
    assert torch.equal(sample(loaded, model.scheduler, 2, **run), images)
    held_out = collect_calibration(model.unet, model.scheduler, 2, SAMPLER, 1, seed=1, progress=False,
                                   conditioning=_conditioning(model, 2))
    error = relative_output_error(loaded, model.unet, held_out)
    # measured 5-8 % on these 8-channel random UNets (per-tensor 8-bit activations, 4 calibration
    # trajectories, held-out seeds); a broken conditioning or quantizer gives tens of percent
    assert error < 0.1, error


@pytest.mark.parametrize("family", ["pixel", "latent", "text", "dit"])
def test_quantized_unet_drops_into_the_matching_diffusers_pipeline(folders, family):
    model = load_model(folders[family])
    steps = 4
    # tfmq's tables follow the timesteps the pipeline's own scheduler visits: calibrate on that sampler
    sampler = SamplerConfig(name="plms" if family == "text" else "ddpm" if family == "pixel" else "ddim",
                            steps=steps, skip_type="uniform")
    if family in ("latent", "dit"):  # their DDIMScheduler spaces steps as its config says, not as tfmq's DDIM
        sampler = None
    calibration = collect_calibration(model.unet, model.scheduler, 2, sampler or SamplerConfig(steps=steps), 1,
                                      progress=False, conditioning=_conditioning(model, 2, 1.0))
    method = "rtn" if family == "latent" else "tfmq"
    # a schedule-free DiT (tables for every training timestep) serves DiTPipeline's own DDIM spacing
    schedule_free = {"train_timesteps": 1000, "fsc_scope": "all"} if family == "dit" else {}
    config = _w8a8(method, recon_weight_iters=2, recon_act_iters=1, **schedule_free)
    pipeline = model.pipeline(quantize(model.unet, config, calibration, progress=False))
    assert type(pipeline).__name__ == model.layout
    generator = torch.Generator().manual_seed(0)
    if family == "text":
        images = pipeline(PROMPTS[:2], num_inference_steps=steps, guidance_scale=1.0, generator=generator,
                          output_type="np").images
    elif family == "dit":  # guidance 1: DiTPipeline's null label is ImageNet's 1000, not this model's
        images = pipeline(class_labels=[0, 2], num_inference_steps=steps, guidance_scale=1.0, generator=generator,
                          output_type="np").images
    else:
        images = pipeline(batch_size=2, num_inference_steps=steps, generator=generator, output_type="np").images
    assert images.shape[0] == 2 and images.min() >= 0 and images.max() <= 1
