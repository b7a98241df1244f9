import pytest
import torch
from diffusers import DDIMScheduler
from tests.conftest import tiny_unet

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.sampling import SamplerConfig, sample, sampling_timesteps
from tfmq.sampling.noise import draw, image_generators

SCHEDULER = fashion_ddpm_scheduler()


@pytest.mark.parametrize("config", [
    SamplerConfig(steps=8), SamplerConfig(steps=8, eta=1.0), SamplerConfig(name="ddpm", steps=8)])
def test_same_seed_same_images_other_seed_other_images(config):
    unet = tiny_unet()
    first = sample(unet, SCHEDULER, 4, seed=1, config=config, batch_size=2, progress=False)
    again = sample(unet, SCHEDULER, 4, seed=1, config=config, batch_size=2, progress=False)
    other = sample(unet, SCHEDULER, 4, seed=2, config=config, batch_size=2, progress=False)
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.05


def test_image_noise_depends_on_seed_and_index_not_on_batching():
    unet = tiny_unet()
    config = SamplerConfig(steps=6, eta=1.0)
    whole = sample(unet, SCHEDULER, 5, seed=3, config=config, batch_size=5, progress=False)
    split = sample(unet, SCHEDULER, 5, seed=3, config=config, batch_size=2, progress=False)
    # oneDNN may pick other conv kernels per batch size: float noise only, no different random numbers
    torch.testing.assert_close(whole, split, atol=1e-3, rtol=0)
    prefix = sample(unet, SCHEDULER, 2, seed=3, config=config, batch_size=2, progress=False)
    assert torch.equal(prefix, split[:2])


def test_uniform_ddim_equals_diffusers_ddim_scheduler():
    unet = tiny_unet()
    ours = sample(unet, SCHEDULER, 3, seed=0, config=SamplerConfig(steps=10, skip_type="uniform"),
                  batch_size=3, progress=False)
    reference = DDIMScheduler.from_config(SCHEDULER.config, set_alpha_to_one=True, timestep_spacing="leading",
                                          steps_offset=0)
    reference.set_timesteps(10)
    x = draw(image_generators(0, range(3)), (1, 8, 8))
    with torch.no_grad():
        for t in reference.timesteps:
            x = reference.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_observer_sees_every_scheduled_timestep_in_order():
    seen = []
    config = SamplerConfig(steps=7)
    sample(tiny_unet(), SCHEDULER, 2, config=config, progress=False,
           observer=lambda index, t, x: seen.append((index, t, tuple(x.shape))))
    assert [t for _, t, _ in seen] == sampling_timesteps(SCHEDULER, config).tolist()
    assert [index for index, _, _ in seen] == list(range(7))


def test_bad_sampler_settings_are_errors():
    with pytest.raises(TfmqError):
        SamplerConfig(steps=0)
    with pytest.raises(TfmqError):
        SamplerConfig(name="euler")
    with pytest.raises(TfmqError):
        sample(tiny_unet(), SCHEDULER, 0, progress=False)
