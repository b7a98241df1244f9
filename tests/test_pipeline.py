"""The main job in one call: what the CLI and the demo run."""

from tests.conftest import tiny_unet

from tfmq.models.loading import load_model
from tfmq.pipeline import CalibrationSettings, calibrate, quantize_and_save
from tfmq.quant.checkpoint import load_quantized, read_metadata
from tfmq.quant.config import RTNConfig
from tfmq.sampling import SamplerConfig


def test_calibrate_quantize_save_and_report(tmp_path, tiny_model_folder):
    model = load_model(tiny_model_folder)
    settings = CalibrationSettings(num_samples=2, sampler=SamplerConfig(steps=4), interval_length=2, seed=3)
    calibration = calibrate(model, settings, lambda count: None, progress=False)
    config = RTNConfig(w_bits=4, a_bits=8)
    quantized, report = quantize_and_save(model, config, calibration, tmp_path / "q",
                                          conditioning_for=lambda count: None, progress=False)
    recorded = read_metadata(tmp_path / "q")["provenance"]["calibration"]
    assert recorded["num_samples"] == 2 and recorded["seed"] == 3 and recorded["interval_length"] == 2
    assert recorded["sampler"]["steps"] == 4 and recorded["samples"] == len(calibration)
    assert recorded["collect_seconds"] == calibration.provenance.collect_seconds > 0
    assert report.collect_seconds == recorded["collect_seconds"] and report.quantize_seconds > 0
    assert 0 < report.relative_output_error < 1 and report.file_bytes < report.fp32_bytes
    assert report.row()["calib samples"] == len(calibration) == 2 * 4
    assert load_quantized(tmp_path / "q", tiny_unet()).tfmq_info.config == quantized.tfmq_info.config == config
