import json

import pytest
from diffusers import DDPMPipeline
from PIL import Image

from tests.quant.tiny_unets import pixel_unet
from tfmq.demo import COMPARISON_FILE, REPORT_FILE, DemoSettings, run_demo
from tfmq.errors import TfmqError
from tfmq.models.architectures import FASHION_RESOLUTION, fashion_ddpm_scheduler
from tfmq.quant.config import RTNConfig


@pytest.fixture
def gray_16px_folder(tmp_path):
    """A tiny random model at the metrics network's resolution (the demo measures FID against the test set)."""
    folder = tmp_path / "tiny-16px"
    unet = pixel_unet(channels=1, size=FASHION_RESOLUTION)
    DDPMPipeline(unet=unet, scheduler=fashion_ddpm_scheduler()).save_pretrained(folder)
    return folder


def test_demo_writes_picture_report_and_a_loadable_model(tmp_path, gray_16px_folder):
    settings = DemoSettings(model=str(gray_16px_folder), num_images=6, calib_samples=3, steps=4,
                            config=RTNConfig(w_bits=4, a_bits=8))
    summary = run_demo(tmp_path / "demo", settings, progress=False)
    fp, quantized = summary["rows"]
    assert fp["model"] == "full precision" and quantized["model"] == "rtn W4A8"
    assert 0 < quantized["ssim_to_fp"] <= 1 and quantized["psnr_to_fp"] > 0
    with Image.open(tmp_path / "demo" / COMPARISON_FILE) as picture:
        assert picture.width > 2 * picture.height * 0.9  # two grids side by side
    assert "rtn W4A8" in (tmp_path / "demo" / REPORT_FILE).read_text()
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["settings"]["num_images"] == 6
    assert (tmp_path / "demo" / "quantized_model" / "quantization.json").is_file()


def test_a_failed_demo_leaves_no_folder_and_the_users_folder_alone(tmp_path, tiny_model_folder):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("keep")
    settings = DemoSettings(model=str(tiny_model_folder), num_images=2, calib_samples=2, steps=2,
                            config=RTNConfig(w_bits=8, a_bits=8))
    with pytest.raises(TfmqError, match="was not written by tfmq"):
        run_demo(tmp_path / "demo", settings, progress=False)
    with pytest.raises(TfmqError, match="reference statistics were made from 16x16"):  # 8x8 images: no FID
        run_demo(tmp_path / "fresh", settings, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo", "tiny-ddpm"]
    assert (tmp_path / "demo" / "notes.txt").read_text() == "keep"
