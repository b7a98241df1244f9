import json
import re
import shutil
import sys
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tests.export.conftest import SAMPLER
from tfmq import sample
from tfmq.errors import TfmqError
from tfmq.export import GraphInfo, OnnxUNet, export_onnx
from tfmq.export.metadata import DIGEST_KEY, graph_digest
from tfmq.export.runtime import u8s8_saturates, widen_saturating_int8_weights


@pytest.fixture(scope="module")
def exact_graph(pixel_w4a8, tmp_path_factory):
    return export_onnx(pixel_w4a8, tmp_path_factory.mktemp("runtime") / "exact.onnx", exact_convs=True)


def test_the_sampler_runs_unchanged_on_the_engine(exact_graph, pixel_w4a8, scheduler):
    engine = OnnxUNet(exact_graph, threads=1)
    assert engine.config.sample_size == pixel_w4a8.config.sample_size and engine.config["in_channels"] == 3
    images = sample(engine, scheduler, 3, seed=5, config=SAMPLER, batch_size=2, progress=False)
    reference = sample(pixel_w4a8, scheduler, 3, seed=5, config=SAMPLER, batch_size=2, progress=False)
    # The exact graph differs by float summation order (and the rounding flips it can cause): tiny, in [-1, 1].
    assert (images - reference).abs().max() < 1e-2


def test_4bit_weights_run_the_same_widened_or_as_stored(exact_graph):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # seeded: not the order of the tests
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


def edited_graph(source, destination, edit, *, resign: bool = False):
    """A copy of the graph at `source` changed by `edit(model)`; `resign`: with its digest made to match, as a
    writer that signs whatever it writes would, which leaves the checks of the content itself to refuse it."""
    model = onnx.load(str(source))
    edit(model)
    if resign:
        next(prop for prop in model.metadata_props if prop.key == DIGEST_KEY).value = graph_digest(model)
    onnx.save(model, str(destination))
    return destination


def flip_weight_byte(model) -> None:
    weight = next(tensor for tensor in model.graph.initializer if len(tensor.raw_data) > 16)
    raw = bytearray(weight.raw_data)
    raw[len(raw) // 2] ^= 0x01
    weight.raw_data = bytes(raw)


def set_prop(key: str, value) -> Callable:
    def edit(model) -> None:
        next(prop for prop in model.metadata_props if prop.key == key).value = json.dumps(value)
    return edit


def drop_digest(model) -> None:
    entries = [(prop.key, prop.value) for prop in model.metadata_props if prop.key != DIGEST_KEY]
    del model.metadata_props[:]
    for key, value in entries:
        model.metadata_props.add(key=key, value=value)


@pytest.mark.parametrize("edit, resign, fragment", [
    pytest.param(flip_weight_byte, False, "was modified after export", id="flipped-weight-byte"),
    pytest.param(set_prop("tfmq.schedule", [999, 500, 0]), False, "was modified after export", id="schedule"),
    pytest.param(set_prop("tfmq.details", {"sampler": {"steps": 50}}), False, "was modified after export",
                 id="details"),
    pytest.param(drop_digest, False, "carries no tfmq digest", id="older-tfmq"),
    pytest.param(set_prop("tfmq.unet_config", [8, 16]), True, "unet_config must be a JSON object, got a list",
                 id="unet_config-list"),
])
def test_a_graph_changed_after_export_is_refused(exact_graph, tmp_path, edit, resign, fragment):
    path = edited_graph(exact_graph, tmp_path / "edited.onnx", edit, resign=resign)
    with pytest.raises(TfmqError) as caught:
        OnnxUNet(path, threads=1)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_a_resigned_but_unchanged_graph_loads(exact_graph, tmp_path):
    engine = OnnxUNet(edited_graph(exact_graph, tmp_path / "same.onnx", lambda model: None, resign=True), threads=1)
    assert engine.info == OnnxUNet(exact_graph, threads=1).info


@pytest.mark.parametrize("key, value, fragment", [
    ("unet_config", [8, 16], "unet_config must be a JSON object, got a list"),
    ("format", "int4", "format must be one of int8, fp32, got 'int4'"),
    ("schedule", [800, "400"], "schedule must be a non-empty list of ints"),
    ("schedule", 800, "schedule must be a non-empty list of ints"),
    ("schedule", None, "an int8 graph needs the schedule it serves"),
    ("details", [], "details must be a JSON object, got a list"),
    ("unet_class", 3, "unet_class must be a string"),
])
def test_graph_metadata_of_the_wrong_kind_is_a_one_line_error(key, value, fragment):
    props = GraphInfo("int8", "UNet2DModel", {"sample_size": 8}, [800, 400], {}).to_props()
    props[f"tfmq.{key}"] = json.dumps(value)
    with pytest.raises(TfmqError, match=re.escape(fragment)):
        GraphInfo.from_props(props, "unet.onnx")


def matmul_graph(weight_codes: np.ndarray) -> onnx.ModelProto:
    """uint8 activations (scale 1, zero point 0) times int8 weight codes (scale 1): the DQ -> MatMul pair that
    onnxruntime fuses into MatMulIntegerToFloat, whose float output is exact for these small integers."""
    helper, tensor = onnx.helper, onnx.numpy_helper.from_array
    width = weight_codes.shape[1]
    initializers = [tensor(weight_codes, "codes"), tensor(np.ones(width, np.float32), "scale"),
                    tensor(np.zeros(width, np.int8), "zero_point"), tensor(np.float32(1), "unit"),
                    tensor(np.uint8(0), "activation_zero_point")]
    nodes = [helper.make_node("DequantizeLinear", ["activations", "unit", "activation_zero_point"], ["inputs"]),
             helper.make_node("DequantizeLinear", ["codes", "scale", "zero_point"], ["weight"], axis=1),
             helper.make_node("MatMul", ["inputs", "weight"], ["outputs"])]
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info(
        "activations", onnx.TensorProto.UINT8, [4, weight_codes.shape[0]])], [helper.make_tensor_value_info(
        "outputs", onnx.TensorProto.FLOAT, [4, width])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run_graph(model: onnx.ModelProto, activations: np.ndarray) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"activations": activations})[0]


def test_int8_weights_that_can_saturate_run_exactly_once_widened():
    generator = np.random.default_rng(0)
    codes = generator.integers(-127, 128, (64, 8)).astype(np.int8)
    codes[:, 0] = 127  # the worst case: every pair of products 255 * 127
    activations = generator.integers(0, 256, (4, 64)).astype(np.uint8)
    activations[0] = 255
    exact = activations.astype(np.int64) @ codes.astype(np.int64)
    as_exported = matmul_graph(codes)
    # The probe tells the truth about this CPU's fused kernels (saturating ones: x86 without VNNI).
    assert (not np.array_equal(run_graph(as_exported, activations), exact)) == u8s8_saturates()
    assert widen_saturating_int8_weights(as_exported, onnx) == 1
    assert np.array_equal(run_graph(as_exported, activations), exact)
    small = matmul_graph((codes // 2).astype(np.int8))  # within +-64: safe on every CPU, left as it is
    assert widen_saturating_int8_weights(small, onnx) == 0


@pytest.fixture(scope="module")
def external_graph(pixel_w4a8, tmp_path_factory):
    """The exact graph again, with its weights forced into a data file beside it."""
    return export_onnx(pixel_w4a8, tmp_path_factory.mktemp("external") / "exact.onnx", exact_convs=True,
                       external_data_threshold_bytes=0)


def test_a_graph_with_external_data_runs_like_the_inline_one(exact_graph, external_graph):
    data_file = external_graph.with_name("exact.onnx.data")
    assert sorted(path.name for path in external_graph.parent.iterdir()) == ["exact.onnx", "exact.onnx.data"]
    assert not exact_graph.with_name("exact.onnx.data").exists()  # small graphs stay one file
    stored = onnx.load(str(external_graph), load_external_data=False)
    external = [tensor for tensor in stored.graph.initializer if onnx.external_data_helper.uses_external_data(tensor)]
    assert external and not any(tensor.HasField("raw_data") for tensor in external)
    sizes = [path.stat().st_size for path in (external_graph, data_file, exact_graph)]
    assert sizes[0] < sizes[2] < sizes[0] + sizes[1]  # the weights moved, the graph stayed
    inline, separate = OnnxUNet(exact_graph, threads=1), OnnxUNet(external_graph, threads=1)
    assert separate.files == [external_graph, data_file] and inline.files == [exact_graph]
    assert separate.info == inline.info
    x = torch.randn(2, 3, 8, 8)
    for timestep in inline.info.schedule[::2]:
        assert torch.allclose(separate(x, timestep).sample, inline(x, timestep).sample, rtol=0, atol=1e-6)


def copied(graph, folder):
    """The files of the export at `graph` copied into `folder`; the copy's graph."""
    for source in graph.parent.iterdir():
        shutil.copy(source, folder / source.name)
    return folder / graph.name


def flip_data_byte(data_file) -> None:
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))


def edit_stored(graph, edit) -> None:
    """`edit` the graph file as stored, its weights left in the data file."""
    model = onnx.load(str(graph), load_external_data=False)
    edit(model)
    onnx.save(model, str(graph))


def move_weights_elsewhere(model) -> None:
    tensor = next(tensor for tensor in model.graph.initializer if tensor.external_data)
    next(entry for entry in tensor.external_data if entry.key == "location").value = "other.data"
    next(prop for prop in model.metadata_props if prop.key == DIGEST_KEY).value = graph_digest(model)


@pytest.mark.parametrize("change, fragment", [
    pytest.param(flip_data_byte, "exact.onnx.data was modified after export", id="flipped-byte"),
    pytest.param(lambda data_file: data_file.write_bytes(data_file.read_bytes() + b"\0"),
                 "exact.onnx.data was modified after export", id="appended-byte"),
    pytest.param(lambda data_file: data_file.unlink(), "which is missing", id="missing"),
    pytest.param(lambda data_file: edit_stored(data_file.with_suffix(""), move_weights_elsewhere),
                 "keeps its weights in exact.onnx.data, other.data", id="resigned-location"),
])
def test_a_data_file_changed_after_export_is_refused(external_graph, tmp_path, change, fragment):
    graph = copied(external_graph, tmp_path)
    change(graph.with_name("exact.onnx.data"))
    with pytest.raises(TfmqError) as caught:
        OnnxUNet(graph, threads=1)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), caught.value
