import pytest
import torch
from diffusers import DDIMScheduler
from tests.conftest import tiny_unet
from tests.quant.tiny_unets import text_unet

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.sampling import Conditioning, SamplerConfig, distinct_timesteps, sample, sampling_timesteps
from tfmq.sampling.noise import draw, image_generators

SCHEDULER = fashion_ddpm_scheduler()


@pytest.mark.parametrize("config", [
    SamplerConfig(steps=8), SamplerConfig(steps=8, eta=1.0), SamplerConfig(name="ddpm", steps=8),
    SamplerConfig(name="plms", steps=8), SamplerConfig(name="dpm-solver", steps=8)])
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
           observer=lambda index, t, x, conditions: seen.append((index, t, tuple(x.shape))))
    assert [t for _, t, _ in seen] == sampling_timesteps(SCHEDULER, config).tolist()
    assert [index for index, _, _ in seen] == list(range(7))


def test_bad_sampler_settings_are_errors():
    with pytest.raises(TfmqError):
        SamplerConfig(steps=0)
    with pytest.raises(TfmqError):
        SamplerConfig(name="euler")
    with pytest.raises(TfmqError):
        sample(tiny_unet(), SCHEDULER, 0, progress=False)


def test_plms_visits_a_timestep_twice_and_tables_see_it_once():
    visited = sampling_timesteps(SCHEDULER, SamplerConfig(name="plms", steps=10))
    distinct = distinct_timesteps(visited)
    assert len(visited) == 11 and len(distinct) == 10
    assert distinct.tolist() == sorted(set(visited.tolist()), reverse=True)


def _text_conditioning(scale: float, count: int = 3) -> Conditioning:
    generator = torch.Generator().manual_seed(0)
    return Conditioning({"encoder_hidden_states": torch.randn(count, 3, 8, generator=generator)},
                        {"encoder_hidden_states": torch.zeros(1, 3, 8)}, scale)


def test_guidance_runs_both_branches_and_scale_one_only_the_conditional():
    unet = text_unet()
    shapes = {}
    for scale in (1.0, 3.0):
        seen = []
        sample(unet, SCHEDULER, 3, config=SamplerConfig(steps=3), progress=False, conditioning=_text_conditioning(scale),
               observer=lambda index, t, x, conditions: seen.append((x, conditions["encoder_hidden_states"])))
        shapes[scale] = seen[0][0].shape[0]
        if scale != 1.0:  # unconditional branch first, then the images' own conditions
            assert torch.equal(seen[0][1][:3], torch.zeros(3, 3, 8))
            assert torch.equal(seen[0][0][:3], seen[0][0][3:])
    assert shapes == {1.0: 3, 3.0: 6}
    plain = sample(unet, SCHEDULER, 3, config=SamplerConfig(steps=3), progress=False, conditioning=_text_conditioning(1.0))
    guided = sample(unet, SCHEDULER, 3, config=SamplerConfig(steps=3), progress=False, conditioning=_text_conditioning(3.0))
    assert (plain - guided).abs().mean() > 1e-3


def test_conditions_follow_their_images_across_batchings():
    unet = text_unet()
    whole = sample(unet, SCHEDULER, 3, config=SamplerConfig(steps=3), progress=False, batch_size=3,
                   conditioning=_text_conditioning(2.0))
    split = sample(unet, SCHEDULER, 3, config=SamplerConfig(steps=3), progress=False, batch_size=1,
                   conditioning=_text_conditioning(2.0))
    torch.testing.assert_close(whole, split, atol=1e-4, rtol=0)


def test_bad_conditioning_is_an_error():
    with pytest.raises(TfmqError, match="unconditional branch"):
        Conditioning({"class_labels": torch.zeros(2, dtype=torch.long)}, None, 2.0)
    with pytest.raises(TfmqError, match="one per image"):
        sample(text_unet(), SCHEDULER, 5, config=SamplerConfig(steps=2), progress=False,
               conditioning=_text_conditioning(1.0))


def test_decoder_turns_latents_into_images():
    decoded = sample(text_unet(), SCHEDULER, 3, config=SamplerConfig(steps=2), progress=False,
                     conditioning=_text_conditioning(1.0), decoder=lambda latents: latents[:, :1] * 100)
    assert decoded.shape == (3, 1, 8, 8)
    assert decoded.abs().max() <= 1.0
