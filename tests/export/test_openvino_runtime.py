"""The OpenVINO engine runs the graphs `export_onnx` writes, as onnxruntime does: same inputs, same checks,
the fake-quant model's outputs up to OpenVINO's own integer kernels."""

from __future__ import annotations

import pytest
import torch

from tests.export.conftest import SAMPLER
from tests.export.test_onnx_export import INTEGER_TOLERANCE
from tests.quant.tiny_unets import tiny_dit, unet_inputs
from tfmq.errors import TfmqError
from tfmq.export import OnnxUNet, export_onnx, graph_engine, trajectory_inputs
from tfmq.export.openvino_runtime import OpenVinoUNet
from tfmq.models.architectures import latent_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import RTNConfig
from tfmq.sampling import Conditioning, distinct_timesteps, sample, sampling_timesteps

# Relative L2 difference of a DiT sampling run against the fake-quant model's: OpenVINO's kernels round some
# products differently from it (measured on fashion-dit: 0.2-0.9 % a call against onnxruntime's engine, which
# is exact there; a wrong row or grid gives tens of per cent).
TOLERANCE = 0.03


def _relative(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def unet_graph(pixel_w4a8, scheduler, tmp_path_factory):
    calibration = trajectory_inputs(pixel_w4a8, scheduler, SAMPLER, num_images=2)
    return export_onnx(pixel_w4a8, tmp_path_factory.mktemp("ov") / "unet.onnx", calibration=calibration)


@pytest.fixture(scope="module")
def dit_graph(tmp_path_factory):
    conditioning = Conditioning({"class_labels": torch.tensor([0, 2])}, {"class_labels": torch.tensor([3])},
                                guidance_scale=2.0)
    calibration = collect_calibration(tiny_dit(), latent_scheduler(), 2, SAMPLER, 1, progress=False,
                                      conditioning=conditioning)
    model = quantize(tiny_dit(), RTNConfig(w_bits=4, a_bits=8, fsc_scope="temporal"), calibration, progress=False)
    schedule = distinct_timesteps(sampling_timesteps(latent_scheduler(), SAMPLER))
    return model, conditioning, export_onnx(model, tmp_path_factory.mktemp("ov") / "dit.onnx", schedule=schedule)


def test_a_unet_graph_gives_the_fake_quant_noise_at_every_step_as_onnxruntime_does(pixel_w4a8, unet_graph):
    onnxruntime_engine, openvino_engine = OnnxUNet(unet_graph, threads=1), graph_engine(unet_graph, "openvino",
                                                                                       threads=1)
    assert isinstance(openvino_engine, OpenVinoUNet) and openvino_engine.info == onnxruntime_engine.info
    for index, timestep in enumerate(openvino_engine.info.schedule):
        inputs = {**unet_inputs(pixel_w4a8, 3, index), "timestep": torch.full((3,), timestep)}
        with torch.no_grad():
            reference = pixel_w4a8(**inputs).sample
        # both runtimes add their own rounding of the 8-bit conv outputs to the fake-quant model's
        assert _relative(onnxruntime_engine(**inputs).sample, reference) < INTEGER_TOLERANCE
        assert _relative(openvino_engine(**inputs).sample, reference) < INTEGER_TOLERANCE


def test_a_dit_graph_samples_the_fake_quant_images_with_class_labels(dit_graph):
    model, conditioning, path = dit_graph
    run = {"config": SAMPLER, "progress": False, "seed": 2, "conditioning": conditioning}
    engine = OpenVinoUNet(path, threads=1)
    assert _relative(sample(engine, latent_scheduler(), 2, **run), sample(model, latent_scheduler(), 2, **run)) \
        < TOLERANCE
    with pytest.raises(TfmqError, match="class label 4 is outside 0..3"):
        engine(torch.zeros(1, 4, 8, 8), engine.info.schedule[0], class_labels=torch.tensor([4]))


def test_without_openvino_the_engine_names_its_extra(unet_graph, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    with pytest.raises(TfmqError, match=r"openvino cannot be imported .*pip install 'tfmq\[openvino\]'"):
        graph_engine(unet_graph, "openvino")


def test_a_graph_with_its_weights_in_a_data_file_runs_as_the_inline_one(pixel_w4a8, tmp_path):
    inline = export_onnx(pixel_w4a8, tmp_path / "inline.onnx", exact_convs=True)
    external = export_onnx(pixel_w4a8, tmp_path / "external.onnx", exact_convs=True, external_data_threshold_bytes=0)
    engines = [OpenVinoUNet(path, threads=1) for path in (inline, external)]
    assert engines[1].files == [external, tmp_path / "external.onnx.data"]
    inputs = {**unet_inputs(pixel_w4a8, 2, 0), "timestep": torch.full((2,), engines[0].info.schedule[0])}
    assert torch.equal(engines[0](**inputs).sample, engines[1](**inputs).sample)
