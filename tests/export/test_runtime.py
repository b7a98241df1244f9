import sys

import pytest
import torch

from tests.export.conftest import SAMPLER
from tfmq import sample
from tfmq.errors import TfmqError
from tfmq.export import OnnxUNet, export_onnx


@pytest.fixture(scope="module")
def exact_graph(pixel_w4a8, tmp_path_factory):
    return export_onnx(pixel_w4a8, tmp_path_factory.mktemp("runtime") / "exact.onnx", integer_convs=False)


def test_the_sampler_runs_unchanged_on_the_engine(exact_graph, pixel_w4a8, scheduler):
    engine = OnnxUNet(exact_graph, threads=1)
    assert engine.config.sample_size == pixel_w4a8.config.sample_size and engine.config["in_channels"] == 3
    images = sample(engine, scheduler, 3, seed=5, config=SAMPLER, batch_size=2, progress=False)
    reference = sample(pixel_w4a8, scheduler, 3, seed=5, config=SAMPLER, batch_size=2, progress=False)
    # The exact graph differs by float summation order (and the rounding flips it can cause): tiny, in [-1, 1].
    assert (images - reference).abs().max() < 1e-2


def test_4bit_weights_run_the_same_widened_or_as_stored(exact_graph):
    x = torch.randn(2, 3, 8, 8)
    widened = OnnxUNet(exact_graph, threads=1)
    stored = OnnxUNet(exact_graph, threads=1, widen_4bit=False)
    timestep = widened.info.schedule[1]
    assert torch.allclose(widened(x, timestep).sample, stored(x, timestep).sample, atol=1e-5)
    assert widened(x, timestep, return_dict=False)[0].shape == x.shape


def test_bad_calls_are_clear_errors(exact_graph, tmp_path, monkeypatch):
    engine = OnnxUNet(exact_graph, threads=1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TfmqError, match="timestep 7 is not in the exported schedule"):
        engine(x, 7)
    with pytest.raises(TfmqError, match="one timestep per batch"):
        engine(x, torch.tensor(engine.info.schedule[:2]))
    with pytest.raises(TfmqError, match="not text-conditional"):
        engine(x, engine.info.schedule[0], encoder_hidden_states=torch.randn(2, 3, 8))
    with pytest.raises(TfmqError, match="does not exist"):
        OnnxUNet(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(TfmqError, match="cannot read"):
        OnnxUNet(tmp_path / "junk.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(TfmqError, match="onnxruntime cannot be imported"):
        OnnxUNet(exact_graph)
