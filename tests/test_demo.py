import json

from PIL import Image

from tfmq.demo import COMPARISON_FILE, REPORT_FILE, DemoSettings, run_demo
from tfmq.quant.config import QuantConfig


def test_demo_writes_picture_report_and_a_loadable_model(tmp_path, tiny_model_folder):
    settings = DemoSettings(model=str(tiny_model_folder), num_images=6, calib_samples=3, steps=4,
                            config=QuantConfig(method="rtn", w_bits=4, a_bits=8))
    summary = run_demo(tmp_path / "demo", settings, progress=False)
    fp, quantized = summary["rows"]
    assert fp["model"] == "full precision" and quantized["model"] == "rtn W4A8"
    assert 0 < quantized["ssim_to_fp"] <= 1 and quantized["psnr_to_fp"] > 0
    with Image.open(tmp_path / "demo" / COMPARISON_FILE) as picture:
        assert picture.width > 2 * picture.height * 0.9  # two grids side by side
    assert "rtn W4A8" in (tmp_path / "demo" / REPORT_FILE).read_text()
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["settings"]["num_images"] == 6
    assert (tmp_path / "demo" / "quantized_model" / "quantization.json").is_file()
