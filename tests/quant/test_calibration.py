import gc
import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.quant.tiny_unets import class_unet, pixel_unet

from tfmq.errors import TfmqError
from tfmq.files import owned_safetensors
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.calibration import CalibrationProvenance, CalibrationSet, collect_calibration, spread
from tfmq.quant.provenance import model_fingerprint
from tfmq.sampling import Conditioning, SamplerConfig, sampling_timesteps

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


def test_a_collected_set_records_what_it_was_made_from():
    unet = pixel_unet()
    calibration = collect_calibration(unet, SCHEDULER, 3, SAMPLER, interval_length=5, seed=4, progress=False)
    assert calibration.provenance == CalibrationProvenance(model_fingerprint(unet), SAMPLER, 3, 4, 1.0)
    calibration.check_made_for(pixel_unet(), SamplerConfig(steps=10), 1.0)


def test_provenance_survives_save_and_load_and_is_checked(tmp_path):
    _collect().save(tmp_path / "calib.safetensors")
    loaded = CalibrationSet.load(tmp_path / "calib.safetensors")
    assert loaded.provenance == _collect().provenance
    loaded.check_made_for(pixel_unet(), SAMPLER)
    with pytest.raises(TfmqError, match=r"recorded with ddim 10 steps \(eta 0.0, quad skip\), not ddim 4 steps"):
        loaded.check_made_for(pixel_unet(), SamplerConfig(steps=4))
    with pytest.raises(TfmqError, match=r"recorded with ddim 10 steps .*, not plms 10 steps$"):
        loaded.check_made_for(pixel_unet(), SamplerConfig(name="plms", steps=10))
    with pytest.raises(TfmqError, match=r"recorded with guidance scale 1, not 3"):
        loaded.check_made_for(pixel_unet(), SAMPLER, 3.0)
    with pytest.raises(TfmqError, match=r"recorded with another model \(fingerprint [0-9a-f]{12}, not [0-9a-f]{12}\)"):
        loaded.check_made_for(pixel_unet(seed=1), SAMPLER)


def test_sets_without_provenance_or_with_a_wrong_digest_are_refused(tmp_path):
    calibration = _collect()
    replace(calibration, provenance=None).save(tmp_path / "old.safetensors")
    with pytest.raises(TfmqError, match="records no model, sampler or guidance"):
        CalibrationSet.load(tmp_path / "old.safetensors").check_made_for(pixel_unet(), SAMPLER)
    calibration.save(tmp_path / "calib.safetensors")
    tensors = load_file(str(tmp_path / "calib.safetensors"))
    with safe_open(str(tmp_path / "calib.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    changed = {**tensors, "samples": tensors["samples"] + 1}
    save_file(changed, str(tmp_path / "changed.safetensors"), metadata=metadata)
    relabelled = json.loads(metadata["provenance"])
    relabelled["sampler"]["steps"] = 4
    save_file(tensors, str(tmp_path / "relabelled.safetensors"),
              metadata={**metadata, "provenance": json.dumps(relabelled)})
    save_file(tensors, str(tmp_path / "undigested.safetensors"),
              metadata={key: value for key, value in metadata.items() if key != "digest"})
    for name in ("changed", "relabelled", "undigested"):
        with pytest.raises(TfmqError, match="fails its digest check"):
            CalibrationSet.load(tmp_path / f"{name}.safetensors")


def test_save_creates_its_folder_and_writes_atomically(tmp_path):
    path = tmp_path / "new" / "folder" / "calib.safetensors"
    _collect().save(path)
    assert owned_safetensors(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [entry.name for entry in path.parent.iterdir()] == ["calib.safetensors"]  # no temporary left


@pytest.mark.parametrize("seed, fragment", [(-1, "seed must be >= 0"), (0.5, "seed must be an integer")])
def test_bad_calibration_seeds_are_errors(seed, fragment):
    with pytest.raises(TfmqError, match=fragment):
        collect_calibration(pixel_unet(), SCHEDULER, 2, SAMPLER, seed=seed, progress=False)


def _guided_class_calibration(**budget) -> CalibrationSet:
    conditioning = Conditioning({"class_labels": torch.tensor([0, 1, 2, 1])}, {"class_labels": torch.tensor([3])},
                                guidance_scale=2.0)
    return collect_calibration(class_unet(), SCHEDULER, 4, SAMPLER, interval_length=3, batch_size=2,
                               progress=False, conditioning=conditioning, **budget)


def _same_sets(first: CalibrationSet, second: CalibrationSet) -> bool:
    tensors = [(first.samples, second.samples), (first.timesteps, second.timesteps),
               (first.step_indices, second.step_indices), (first.schedule, second.schedule),
               *((first.conditions[key], second.conditions[key]) for key in first.conditions)]
    return first.conditions.keys() == second.conditions.keys() and all(torch.equal(a, b) for a, b in tensors)


def test_beyond_its_budget_a_set_is_recorded_on_disk_with_the_same_bits(tmp_path):
    in_memory = _guided_class_calibration()
    row_bytes = in_memory.samples[0].numel() * 4 + 8  # a sample and its class label
    spilled = _guided_class_calibration(memory_budget_mb=6 * row_bytes / 2**20, spill_dir=tmp_path)
    assert in_memory.spill is None and spilled.spill is not None
    assert _same_sets(in_memory, spilled) and in_memory.identity() == spilled.identity()
    [folder] = tmp_path.iterdir()  # the staging chunks are gone, the ordered rows stay
    assert folder == spilled.spill.path and len(list(folder.iterdir())) == 2
    # Its subsets and batches read the files: subsets are spilled as well, batches are views.
    for subset, reference in ((spilled.for_weights(), in_memory.for_weights()),
                              (spilled.per_step(2), in_memory.per_step(2))):
        assert subset.spill is spilled.spill and _same_sets(subset, reference)
    batch = spilled.batches(5)[1]
    assert batch["sample"].untyped_storage().data_ptr() == spilled.samples.untyped_storage().data_ptr()
    assert torch.equal(batch["class_labels"], in_memory.conditions["class_labels"][5:10])
    roomy = _guided_class_calibration(memory_budget_mb=1.0, spill_dir=tmp_path)
    assert roomy.spill is None and _same_sets(roomy, in_memory)
    del spilled, subset, batch
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # the folder goes with the last set that reads it


def test_per_step_takes_both_branches_of_a_guided_set():
    # a guided set records each batch's unconditional rows (label 3, the null label) before its conditional ones
    labels = torch.tensor([3, 3, 3, 3, 0, 1, 2, 0] * 2)
    steps = torch.tensor([0] * 8 + [1] * 8)
    calibration = CalibrationSet(torch.randn(16, 1, 2, 2), torch.tensor([900] * 8 + [100] * 8), steps,
                                 torch.tensor([900, 100]), conditions={"class_labels": labels})
    subset = calibration.per_step(2)
    assert subset.conditions["class_labels"].tolist() == [3, 0, 3, 0]
    assert torch.bincount(subset.step_indices).tolist() == [2, 2]


def test_spread_keeps_the_ends_and_never_repeats():
    indices = torch.arange(10, 20)
    assert spread(indices, 3).tolist() == [10, 14, 19]  # 0, 4.5 (rounded to even), 9
    assert spread(indices, 10).tolist() == indices.tolist() and spread(indices, 50).tolist() == indices.tolist()
    assert len(set(spread(indices, 7).tolist())) == 7
