"""Per-unit checkpoints: a run killed after unit k and restarted ends with the model of an uninterrupted run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.quant.tiny_unets import one_thread, pixel_unet

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import TFMQConfig
from tfmq.quant.methods.resume import UNIT_PREFIX, finished_units
from tfmq.files import MARKER_FILE
from tfmq.sampling import SamplerConfig

ROOT = Path(__file__).resolve().parents[3]
CONFIG = TFMQConfig(recon_weight_iters=3, recon_act_iters=3, temporal_cache=True, temporal_selection=True)
# Quantizes in a fresh process and dies (no cleanup, as a killed job) right after the k-th unit checkpoint.
KILLED_RUN = """
import json, os, sys, torch
from tests.quant.tiny_unets import pixel_unet
from tfmq.quant.api import quantize
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.config import TFMQConfig
from tfmq.quant.methods import resume

torch.set_num_threads(1)
save = resume.UnitCheckpoints._save
def save_then_die(self, *args):
    save(self, *args)
    if self.next_index == int(sys.argv[3]):
        os._exit(3)
resume.UnitCheckpoints._save = save_then_die
quantize(pixel_unet(), TFMQConfig.from_dict(json.loads(sys.argv[4])), CalibrationSet.load(sys.argv[1]),
         progress=False, checkpoint_dir=sys.argv[2])
"""


def _killed_run(calibration_file: Path, folder: Path, kill_after: int) -> int:
    import json

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLED_RUN, str(calibration_file), str(folder), str(kill_after),
                           json.dumps(CONFIG.to_dict())], env=env, cwd=ROOT, timeout=300).returncode


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    with one_thread():
        calibration = collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 4, SamplerConfig(steps=4), 2,
                                          progress=False)
    path = tmp_path_factory.mktemp("calibration") / "calibration.safetensors"
    calibration.save(path)
    return path


def test_a_run_killed_after_unit_k_continues_from_there_to_the_same_model(calibration_file, tmp_path):
    from tfmq.quant.calibration import CalibrationSet

    calibration = CalibrationSet.load(calibration_file)
    with one_thread():
        whole = quantize(pixel_unet(), CONFIG, calibration, progress=False, checkpoint_dir=tmp_path / "whole")
    units = finished_units(tmp_path / "whole")
    assert units >= 6  # the TIB and the blocks of the tiny UNet
    kill_after = units // 2
    assert _killed_run(calibration_file, tmp_path / "resumed", kill_after) == 3
    assert finished_units(tmp_path / "resumed") == kill_after
    written = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "resumed").glob(f"{UNIT_PREFIX}*")}
    with one_thread():
        resumed = quantize(pixel_unet(), CONFIG, calibration, progress=False, checkpoint_dir=tmp_path / "resumed")
    assert finished_units(tmp_path / "resumed") == units
    assert all((tmp_path / "resumed" / name).stat().st_mtime_ns == mtime for name, mtime in written.items())  # loaded
    expected, state = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == state.keys()
    assert all(torch.equal(expected[key], state[key]) for key in expected)
    assert whole.tfmq_info.method_results["temporal_selection"] == resumed.tfmq_info.method_results[
        "temporal_selection"]


def test_checkpoints_of_another_run_are_refused_and_left_as_they_are(calibration_file, tmp_path):
    from tfmq.quant.calibration import CalibrationSet

    calibration = CalibrationSet.load(calibration_file)
    folder = tmp_path / "checkpoints"
    with one_thread():
        quantize(pixel_unet(), TFMQConfig(recon_weight_iters=1, recon_act_iters=1), calibration, progress=False,
                 checkpoint_dir=folder)
        before = sorted(path.name for path in folder.iterdir())
        with pytest.raises(TfmqError, match="checkpoints of another run .*quant_config"):
            quantize(pixel_unet(), TFMQConfig(recon_weight_iters=2, recon_act_iters=1), calibration,
                     progress=False, checkpoint_dir=folder)
        with pytest.raises(TfmqError, match="base_model"):
            quantize(pixel_unet(seed=1), TFMQConfig(recon_weight_iters=1, recon_act_iters=1), calibration,
                     progress=False, checkpoint_dir=folder)
    assert sorted(path.name for path in folder.iterdir()) == before


def test_a_changed_checkpoint_is_refused(calibration_file, tmp_path):
    from tfmq.quant.calibration import CalibrationSet

    calibration = CalibrationSet.load(calibration_file)
    folder = tmp_path / "checkpoints"
    config = TFMQConfig(recon_weight_iters=1, recon_act_iters=1)
    with one_thread():
        quantize(pixel_unet(), config, calibration, progress=False, checkpoint_dir=folder)
        unit = sorted(folder.glob(f"{UNIT_PREFIX}*"))[1]
        data = bytearray(unit.read_bytes())
        data[-1] ^= 0xFF
        unit.write_bytes(bytes(data))
        with pytest.raises(TfmqError, match="digest check"):
            quantize(pixel_unet(), config, calibration, progress=False, checkpoint_dir=folder)


def test_a_folder_that_tfmq_did_not_write_is_not_used(calibration_file, tmp_path):
    from tfmq.quant.calibration import CalibrationSet

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with one_thread(), pytest.raises(TfmqError, match="not written by tfmq"):
        quantize(pixel_unet(), TFMQConfig(recon_weight_iters=1), CalibrationSet.load(calibration_file),
                 progress=False, checkpoint_dir=folder)
    assert (folder / "notes.txt").read_text() == "keep me" and not (folder / MARKER_FILE).exists()
