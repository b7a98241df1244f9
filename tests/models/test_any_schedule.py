"""Quantize once, sample with any scheduler: a schedule-free tfmq model (FSC tables on every activation,
temporal cache) of each family, calibrated on one DDIM schedule, samples with other samplers and step
counts and inside unmodified diffusers pipelines with their default schedulers, every call served the table
row of its own timestep (the nearest integer's for a fractional one). How close to full precision that is,
is measured on the shipped models (`benchmarks/any_schedule.py`): tiny random UNets sample chaotically."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LDMPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from torch import nn

from tests.models.test_families import PROMPTS, _conditioning
from tests.models.tiny_pipelines import FAMILIES, write_pipeline
from tests.quant.conftest import single_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from tests.quant.tiny_unets import one_thread

from tfmq.models.loading import load_model
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.config import TFMQConfig
from tfmq.quant.nn import timestep_tables
from tfmq.sampling import SamplerConfig, sample

CALIBRATION_SAMPLER = SamplerConfig(steps=10, skip_type="uniform")
SCHEDULE_FREE = TFMQConfig(w_bits=8, a_bits=8, fsc_scope="all", temporal_cache=True, train_timesteps=1000,
                           recon_weight_iters=4, recon_act_iters=2)
SAMPLERS = [SamplerConfig(steps=steps, skip_type=skip) for steps in (20, 50, 100) for skip in ("uniform", "quad")] + [
    SamplerConfig(name="dpm-solver", steps=20), SamplerConfig(name="plms", steps=50)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{family: (model, its calibration, the schedule-free quantized UNet)}."""
    root = tmp_path_factory.mktemp("any_schedule")
    built = {}
    with one_thread():
        for family in FAMILIES:
            model = load_model(write_pipeline(family, root / family))
            calibration = collect_calibration(model.unet, model.scheduler, 4, CALIBRATION_SAMPLER, 2, progress=False,
                                              conditioning=_conditioning(model, 4))
            # a class-conditional model's temporal features depend on the label: no cache, tables only
            config = dataclasses.replace(SCHEDULE_FREE, temporal_cache=family not in ("class", "dit"))
            built[family] = (model, calibration, quantize(model.unet, config, calibration, progress=False))
    return built


def served_rows(unet: nn.Module, run: Callable[[], object]) -> list[tuple[float, int]]:
    """(timestep, table row served) of every denoiser call of `run`, the row read where the call ends (a UNet's
    conv_out, a DiT's proj_out_2)."""
    step_rows = timestep_tables(unet).step_rows
    timesteps, rows = [], []
    last = getattr(unet, "conv_out", None) or unet.proj_out_2
    handles = [unet.register_forward_pre_hook(
                   lambda _m, args, kwargs: timesteps.append(float(torch.as_tensor(
                       kwargs["timestep"] if "timestep" in kwargs else args[1]).reshape(-1)[0])), with_kwargs=True),
               last.register_forward_pre_hook(lambda _m, _args: rows.append(int(step_rows.rows)))]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    assert len(rows) == len(timesteps) > 0
    images = result if isinstance(result, torch.Tensor) else torch.as_tensor(result.images)
    assert bool(torch.isfinite(images).all())
    return list(zip(timesteps, rows))


def assert_each_call_read_its_timesteps_row(pairs: list[tuple[float, int]], calibrated: torch.Tensor) -> None:
    assert all(row == round(timestep) for timestep, row in pairs), pairs[:5]
    assert any(int(row) not in set(calibrated.tolist()) for _, row in pairs)  # beyond the calibrated rows


@pytest.mark.parametrize("family", FAMILIES)
def test_one_calibration_samples_with_every_sampler(quantized, family):
    model, calibration, schedule_free = quantized[family]
    assert timestep_tables(schedule_free).schedule_free
    for config in SAMPLERS:
        pairs = served_rows(schedule_free, lambda: sample(
            schedule_free, model.scheduler, 2, seed=3, config=config, progress=False,
            conditioning=_conditioning(model, 2), decoder=model.decoder))
        assert_each_call_read_its_timesteps_row(pairs, calibration.schedule)


def test_at_a_calibrated_timestep_the_schedule_free_model_is_the_schedule_bound_one(quantized):
    # without TIAR both are reconstructed alike; only the tables' rows differ
    model, calibration, _ = quantized["pixel"]
    config = dataclasses.replace(SCHEDULE_FREE, tiar=False)
    free = quantize(model.unet, config, calibration, progress=False)
    bound = quantize(model.unet, dataclasses.replace(config, train_timesteps=None), calibration, progress=False)
    inputs = {"sample": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        for timestep in calibration.schedule.tolist():
            assert torch.equal(free(timestep=timestep, **inputs).sample, bound(timestep=timestep, **inputs).sample)
        with pytest.raises(ValueError, match="not one of the 10 timesteps"):
            bound(timestep=950, **inputs)


def test_diffusers_pixel_pipelines_run_with_their_default_schedulers_and_steps(quantized, tmp_path):
    model, calibration, schedule_free = quantized["pixel"]
    reloaded = load_quantized(save_quantized(schedule_free, tmp_path / "q"), copy.deepcopy(model.unet))
    for pipeline in (DDPMPipeline(unet=reloaded, scheduler=model.scheduler),  # DDPM, 1000 steps
                     DDIMPipeline(unet=reloaded, scheduler=DDIMScheduler.from_config(model.scheduler.config))):
        pairs = served_rows(reloaded, lambda: pipeline(batch_size=2, generator=torch.Generator().manual_seed(0),
                                                       output_type="np"))
        assert_each_call_read_its_timesteps_row(pairs, calibration.schedule)


def test_ldm_pipeline_runs_with_its_default_scheduler(quantized):
    model, calibration, schedule_free = quantized["latent"]
    pipeline = LDMPipeline.from_pretrained(model.source)
    pipeline.unet = schedule_free
    pairs = served_rows(schedule_free, lambda: pipeline(batch_size=2, generator=torch.Generator().manual_seed(0),
                                                        output_type="np"))
    assert_each_call_read_its_timesteps_row(pairs, calibration.schedule)


@pytest.mark.parametrize("scheduler_type", [PNDMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                            DDIMScheduler])
def test_stable_diffusion_pipeline_runs_with_each_scheduler(quantized, scheduler_type):
    model, calibration, schedule_free = quantized["text"]
    pipeline = StableDiffusionPipeline.from_pretrained(model.source)
    # "linspace" spacing: the Euler scheduler then calls the UNet at fractional timesteps
    spacing = {"timestep_spacing": "linspace"} if scheduler_type is EulerDiscreteScheduler else {}
    pipeline.scheduler = scheduler_type.from_config(pipeline.scheduler.config, **spacing)
    pipeline.unet = schedule_free
    pairs = served_rows(schedule_free, lambda: pipeline(prompt=PROMPTS[:2], generator=torch.Generator().manual_seed(0),
                                                        output_type="np"))
    assert_each_call_read_its_timesteps_row(pairs, calibration.schedule)
    if scheduler_type is EulerDiscreteScheduler:
        assert any(timestep != round(timestep) for timestep, _ in pairs)


def test_a_timestep_beyond_the_training_range_is_a_one_line_error(quantized):
    model, _, schedule_free = quantized["pixel"]
    with torch.no_grad(), pytest.raises(ValueError, match=r"^timestep 1000 is outside the model's training range "
                                                        r"0\.\.999[^\n]*$"):
        schedule_free(torch.zeros(1, 1, 8, 8), 1000)
