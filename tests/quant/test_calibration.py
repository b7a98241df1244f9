import pytest
import torch
from tests.quant.tiny_unets import pixel_unet

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.calibration import CalibrationSet, collect_calibration
from tfmq.sampling import SamplerConfig, sampling_timesteps

SCHEDULER = fashion_ddpm_scheduler()
SAMPLER = SamplerConfig(steps=10)


def _collect(seed: int = 0, interval: int = 5) -> CalibrationSet:
    return collect_calibration(pixel_unet(), SCHEDULER, 3, SAMPLER, interval_length=interval, seed=seed,
                               progress=False)


def test_every_step_of_every_trajectory_is_recorded_with_its_timestep():
    calibration = _collect()
    schedule = torch.as_tensor(sampling_timesteps(SCHEDULER, SAMPLER))
    assert len(calibration) == 3 * 10
    assert torch.equal(calibration.schedule, schedule)
    assert torch.equal(calibration.timesteps, schedule[calibration.step_indices])
    assert calibration.samples.shape == (30, 3, 8, 8)
    first_step = calibration.at_steps([0])  # pure noise of the calibration seeds
    assert first_step.samples.std() == pytest.approx(1.0, abs=0.15)


def test_deterministic_for_a_seed_and_different_across_seeds():
    assert torch.equal(_collect(seed=1).samples, _collect(seed=1).samples)
    assert not torch.equal(_collect(seed=1).samples, _collect(seed=2).samples)


def test_weight_subset_takes_every_interval_length_th_step():
    assert _collect(interval=5).for_weights().step_indices.unique().tolist() == [0, 5]
    assert _collect(interval=3).for_weights().step_indices.unique().tolist() == [0, 3, 6, 9]


def test_per_step_subset_is_balanced():
    subset = _collect().per_step(2)
    assert len(subset) == 20
    assert torch.bincount(subset.step_indices).tolist() == [2] * 10


def test_save_and_load_round_trip(tmp_path):
    calibration = _collect(interval=2)
    calibration.save(tmp_path / "calib.safetensors")
    loaded = CalibrationSet.load(tmp_path / "calib.safetensors")
    assert torch.equal(loaded.samples, calibration.samples) and loaded.interval_length == 2
    assert torch.equal(loaded.step_indices, calibration.step_indices)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(TfmqError, match="interval_length"):
        collect_calibration(pixel_unet(), SCHEDULER, 2, SAMPLER, interval_length=0, progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(TfmqError, match="cannot read calibration data"):
        CalibrationSet.load(tmp_path / "junk.safetensors")


def test_timestep_groups_call_one_timestep_at_a_time_and_cover_every_sample():
    calibration = _collect()
    groups = list(calibration.timestep_groups())
    assert len(groups) == 10
    assert all(len(group["timestep"].unique()) == 1 and len(group["sample"]) == 3 for group in groups)
    assert sorted(int(group["timestep"][0]) for group in groups) == sorted(calibration.schedule.tolist())
