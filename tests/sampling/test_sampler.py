import pytest
import torch
from diffusers import DDIMScheduler
from tests.conftest import tiny_unet
from tests.quant.tiny_unets import text_unet

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.sampling import Conditioning, SamplerConfig, check_sample, distinct_timesteps, sample, sampling_timesteps
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


@pytest.mark.parametrize("make, fragment", [
    (lambda: SamplerConfig(eta=float("nan")), "eta must be a finite number"),
    (lambda: SamplerConfig(eta=float("inf")), "eta must be a finite number"),
    (lambda: SamplerConfig(eta=-0.5), "eta must be >= 0"),
    (lambda: SamplerConfig(steps=2.5), "steps must be an integer"),
    (lambda: Conditioning({}, None, float("nan")), "guidance scale must be a finite number"),
    (lambda: Conditioning({}, None, float("-inf")), "guidance scale must be a finite number"),
])
def test_non_finite_or_non_integer_settings_are_errors(make, fragment):
    with pytest.raises(TfmqError, match=fragment):
        make()


@pytest.mark.parametrize("seed, fragment", [(-1, "seed must be >= 0, got -1"), (1.5, "seed must be an integer"),
                                            ("3", "seed must be an integer"), (True, "seed must be an integer")])
def test_negative_or_non_integer_seeds_are_errors(seed, fragment):
    with pytest.raises(TfmqError, match=fragment):
        sample(tiny_unet(), SCHEDULER, 1, seed=seed, config=SamplerConfig(steps=2), progress=False)


def _counting_unet():
    unet, calls = tiny_unet(), []
    unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return unet, calls


@pytest.mark.parametrize("name, steps, fragment", [
    ("plms", 5000, "steps must be between 1 and 1000"), ("ddpm", 10000, "steps must be between 1 and 1000"),
    ("dpm-solver", 1001, "steps must be between 1 and 1000"), ("ddim", 1001, "steps must be between 1 and 1000"),
    ("dpm-solver", 1000, "visits only 999 distinct timesteps"),
])
def test_step_counts_the_scheduler_cannot_serve_are_refused_before_any_unet_call(name, steps, fragment):
    config = SamplerConfig(name=name, steps=steps, skip_type="uniform")
    with pytest.raises(TfmqError, match=fragment):
        sampling_timesteps(SCHEDULER, config)
    unet, calls = _counting_unet()
    with pytest.raises(TfmqError, match=fragment):
        sample(unet, SCHEDULER, 1, config=config, progress=False)
    assert calls == []


def test_a_steps_offset_beyond_the_last_timestep_is_refused():
    shifted = DDIMScheduler.from_config(SCHEDULER.config, steps_offset=1)
    with pytest.raises(TfmqError, match="visits timestep 1000, outside this model's 0..999"):
        sampling_timesteps(shifted, SamplerConfig(name="ddpm", steps=1000))
    assert len(sampling_timesteps(shifted, SamplerConfig(name="ddpm", steps=999))) == 999


def test_a_result_larger_than_memory_is_refused_before_any_unet_call(tmp_path, monkeypatch):
    unet, calls = _counting_unet()
    with pytest.raises(TfmqError, match=r"10000000000 images of 1x8x8 need 2.56 TB of memory, but only .* available"):
        sample(unet, SCHEDULER, 10_000_000_000, config=SamplerConfig(steps=2), progress=False)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:       1 kB\n")
    monkeypatch.setattr("tfmq.sampling.sampler.MEMINFO", meminfo)
    with pytest.raises(TfmqError, match=r"8 images of 1x8x8 need 2.05 kB of memory, but only 1.02 kB"):
        sample(unet, SCHEDULER, 8, config=SamplerConfig(steps=2), progress=False)
    assert calls == []
    meminfo.write_text("MemAvailable:       1000 kB\n")
    assert sample(unet, SCHEDULER, 4, config=SamplerConfig(steps=2), progress=False).shape == (4, 1, 8, 8)


def test_a_decoder_larger_than_the_latents_is_checked_against_memory(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:       2 kB\n")  # 8x8 latents fit, 64x64 images do not
    monkeypatch.setattr("tfmq.sampling.sampler.MEMINFO", meminfo)
    with pytest.raises(TfmqError, match="4 images of 1x64x64 need"):
        sample(tiny_unet(), SCHEDULER, 4, config=SamplerConfig(steps=2), progress=False, batch_size=2,
               decoder=lambda latents: latents.repeat_interleave(8, -1).repeat_interleave(8, -2))


def test_check_sample_makes_the_checks_of_sample_without_sampling():
    unet, calls = _counting_unet()
    with pytest.raises(TfmqError, match="need 2.56 TB of memory"):
        check_sample(unet, SCHEDULER, 10_000_000_000, config=SamplerConfig(steps=2))
    with pytest.raises(TfmqError, match="steps must be between 1 and 1000"):
        check_sample(unet, SCHEDULER, 1, config=SamplerConfig(name="plms", steps=5000))
    with pytest.raises(TfmqError, match="seed must be >= 0"):
        check_sample(unet, SCHEDULER, 1, seed=-3)
    check_sample(unet, SCHEDULER, 4, config=SamplerConfig(name="dpm-solver", steps=20))
    assert calls == []
