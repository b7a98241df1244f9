import collections
import copy
import statistics
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from tests.export.conftest import SAMPLER, assert_exact_but_for_flips
from tests.quant.tiny_unets import pixel_unet, text_unet, unet_inputs
from tfmq.errors import TfmqError
from tfmq.export import OnnxUNet, export_onnx, trajectory_inputs
from tfmq.export.conv_outputs import runs_on_integer_kernels
from tfmq.export.onnx_export import _compact_value_names
from tfmq.export.runtime import widen_uint4_weights
from tfmq.quant.api import quantize
from tfmq.quant.config import RTNConfig
from tfmq.quant.nn.layers import QuantConv2d
from tfmq.sampling import Conditioning, SamplerConfig, sample


# Relative L2 error against the fake-quant torch model. Exact graphs (convs in float on dequantized operands)
# differ by float summation order only, and the order depends on the CPU's kernels. Where a value lies so
# close to a rounding boundary that the order decides its code, that sample differs by a flip: up to a few
# per cent on these tiny random UNets, as the fake-quant model in float32 and in float64 differ from each
# other there. So on most samples an exact graph agrees to float precision with one of the two, and on every
# sample it lies within a flip of one of them. Integer graphs add an 8-bit grid on every conv output, which
# QLinearConv needs: a few per cent a call here (random weights, outliers everywhere); on the trained
# fashion-ddpm see benchmarks/results/integer_inference.md.
EXACT_TOLERANCE = 1e-5
INTEGER_TOLERANCE = 0.1
FLIP_TOLERANCE = INTEGER_TOLERANCE


def relative_errors(output: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per sample of a batch."""
    return ((output - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).tolist()


def engine_calls(engine: OnnxUNet, model, schedule: list[int],
                 tokens: int | None) -> Iterator[tuple[dict, torch.Tensor]]:
    """The inputs and the engine's output of one call per scheduled timestep (text UNets: `tokens` tokens)."""
    for index, timestep in enumerate(schedule):
        inputs = {**unet_inputs(model, 3, index), "timestep": torch.full((3,), timestep)}
        if tokens is not None:
            inputs["encoder_hidden_states"] = torch.randn(3, tokens, model.config.cross_attention_dim,
                                                          generator=torch.Generator().manual_seed(index))
        yield inputs, engine(**inputs).sample


@torch.no_grad()
def engine_vs_fake_quant(engine: OnnxUNet, model, schedule: list[int], tokens: int | None = None) -> list[float]:
    """Relative errors of one call per scheduled timestep."""
    errors = []
    for inputs, output in engine_calls(engine, model, schedule, tokens):
        reference = model(**inputs).sample
        errors.append(float((output - reference).norm() / reference.norm()))
    return errors


@torch.no_grad()
def assert_exact(engine: OnnxUNet, model, schedule: list[int], tokens: int | None = None) -> None:
    double = copy.deepcopy(model).double()
    errors = []
    for inputs, output in engine_calls(engine, model, schedule, tokens):
        in_double = {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()}
        errors += map(min, relative_errors(output, model(**inputs).sample),
                      relative_errors(output.double(), double(**in_double).sample))
    assert_exact_but_for_flips(errors, EXACT_TOLERANCE, FLIP_TOLERANCE)


@pytest.fixture(scope="module")
def pixel_graphs(pixel_w4a8, scheduler, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel")
    calibration = trajectory_inputs(pixel_w4a8, scheduler, SAMPLER, num_images=4)
    return {
        "integer": export_onnx(pixel_w4a8, folder / "integer.onnx", calibration=calibration),
        "exact": export_onnx(pixel_w4a8, folder / "exact.onnx", exact_convs=True),
    }


def optimized_graph(path, tmp_path):
    """The graph onnxruntime actually runs, after its QDQ fusions (widened as OnnxUNet loads it)."""
    engine = OnnxUNet(path, threads=1)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    model = onnx.load(str(path))
    widen_uint4_weights(model, onnx)
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert engine.info.format == "int8"
    return onnx.load(options.optimized_model_filepath).graph


def optimized_op_counts(path, tmp_path) -> collections.Counter:
    """The op types onnxruntime actually runs, after its QDQ fusions."""
    return collections.Counter(node.op_type for node in optimized_graph(path, tmp_path).node)


def test_pixel_unet_graphs_match_the_fake_quant_model(pixel_graphs, pixel_w4a8, schedule):
    exact = OnnxUNet(pixel_graphs["exact"], threads=1)
    integer = OnnxUNet(pixel_graphs["integer"], threads=1)
    assert exact.info.schedule == schedule  # the model's FSC schedule
    assert_exact(exact, pixel_w4a8, schedule)
    assert max(engine_vs_fake_quant(integer, pixel_w4a8, schedule)) < INTEGER_TOLERANCE


def test_graph_holds_qdq_pairs_packed_4bit_weights_and_fuses_into_integer_kernels(pixel_graphs, pixel_w4a8,
                                                                                   tmp_path):
    model = onnx.load(str(pixel_graphs["integer"]))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    types = collections.Counter(onnx.TensorProto.DataType.Name(tensor.data_type) for tensor in model.graph.initializer)
    details = OnnxUNet(pixel_graphs["integer"], threads=1).info.details
    # Every quantized layer outside the TIB: 4-bit weights packed two a byte (codes and zero points; a split
    # conv's per input part); an input QDQ pair each, plus an output pair per integer conv and input part,
    # and the four attention operands per attention.
    layers = details["int8_weights"] + details["uint8_weights"]
    split = details["split_integer_convs"]
    assert types["UINT4"] == 2 * (layers + split) and details["uint4_weights"] == layers + split > 10
    assert ops["QuantizeLinear"] >= layers + details["integer_convs"] + split + 4
    assert ops["DequantizeLinear"] >= ops["QuantizeLinear"] + layers
    fused_graph = optimized_graph(pixel_graphs["integer"], tmp_path)
    fused = collections.Counter(node.op_type for node in fused_graph.node)
    # attention scores: the integer Q.K^T matmul and its scale, nothing more (no zero tensor added)
    producers = {output: node for node in fused_graph.node for output in node.output}
    score_ops = [[producers[node.input[0]].op_type, producers[producers[node.input[0]].input[0]].op_type]
                 for node in fused_graph.node if node.op_type == "Softmax"]
    assert score_ops and all(ops == ["Mul", "MatMulIntegerToFloat"] for ops in score_ops)
    # every group norm's scale and shift in one pass (tfmq.export.norms)
    norms = [module for module in pixel_w4a8.modules() if isinstance(module, torch.nn.GroupNorm)]
    assert fused["BatchNormalization"] == fused["InstanceNormalization"] == len(norms) > 3
    # the split shortcuts as one QLinearConv per input part; float convs only where an operand is unquantized
    assert split >= 1 and fused["QLinearConv"] == details["integer_convs"] + split > 10
    float_convs = [module for module in pixel_w4a8.modules() if isinstance(module, torch.nn.Conv2d)
                   and not (isinstance(module, QuantConv2d) and runs_on_integer_kernels(module))]
    assert fused["Conv"] == len(float_convs) == 2  # conv_in and conv_out, kept in full precision
    assert fused["MatMulIntegerToFloat"] >= 4 + 2  # attention projections and both attention matmuls


def test_convs_matching_a_pattern_stay_exact_and_the_others_integer(pixel_graphs, pixel_w4a8, scheduler, tmp_path):
    calibration = trajectory_inputs(pixel_w4a8, scheduler, SAMPLER, num_images=4)
    path = export_onnx(pixel_w4a8, tmp_path / "shortcuts.onnx", calibration=calibration, exact_convs="*conv_shortcut")
    shortcuts = [name for name, module in pixel_w4a8.named_modules()
                 if name.endswith("conv_shortcut") and runs_on_integer_kernels(module)]
    details = OnnxUNet(path, threads=1).info.details
    all_integer = OnnxUNet(pixel_graphs["integer"], threads=1).info.details
    assert all_integer["exact_convs"] == 0
    assert details["exact_convs"] == len(shortcuts) >= 2
    assert details["integer_convs"] == all_integer["integer_convs"] - len(shortcuts)
    fused = optimized_op_counts(path, tmp_path)
    assert fused["Conv"] == 2 + len(shortcuts)  # conv_in, conv_out and the shortcuts, each one float conv
    assert fused["QLinearConv"] == details["integer_convs"] + details["split_integer_convs"]
    with pytest.raises(TfmqError, match="'\\*conv_shortcutt' matches none of the"):
        export_onnx(pixel_w4a8, tmp_path / "typo.onnx", calibration=calibration, exact_convs=["*conv_shortcutt"])
    assert not (tmp_path / "typo.onnx").exists()


def test_text_unet_graph_takes_the_conditioning_as_input(text_w8a8, scheduler, schedule, tmp_path):
    # Seeded: which tests ran before must not decide the data. The output grids are ranged on four trajectories:
    # on two, one call of the six went past the tolerance (0.11) for some seeds.
    states = torch.randn(4, 3, text_w8a8.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    calibration = trajectory_inputs(text_w8a8, scheduler, SAMPLER, num_images=4,
                                    conditioning=Conditioning({"encoder_hidden_states": states}))
    text = Conditioning({"encoder_hidden_states": states[:2]})
    path = export_onnx(text_w8a8, tmp_path / "text.onnx", schedule=schedule, calibration=calibration)
    engine = OnnxUNet(path, threads=1)
    assert [entry.name for entry in engine.session.get_inputs()] == ["sample", "step", "encoder_hidden_states"]
    assert engine.info.details["uint8_weights"] > 0  # 8-bit weights keep their zero points: exact
    assert max(engine_vs_fake_quant(engine, text_w8a8, schedule, tokens=5)) < INTEGER_TOLERANCE
    exact = OnnxUNet(export_onnx(text_w8a8, tmp_path / "exact.onnx", schedule=schedule, exact_convs=True),
                     threads=1)
    assert_exact(exact, text_w8a8, schedule, tokens=5)
    # The sampler passes the conditioning through to the engine as to the torch model. Over several steps a
    # float-rounding difference (it depends on the thread count) moves activations across rounding
    # boundaries, so the images are compared on average, against what another conditioning changes.
    images = sample(exact, scheduler, 2, config=SAMPLER, progress=False, conditioning=text)
    reference = sample(text_w8a8, scheduler, 2, config=SAMPLER, progress=False, conditioning=text)
    other = Conditioning({"encoder_hidden_states": torch.randn_like(text.per_image["encoder_hidden_states"])})
    otherwise = sample(text_w8a8, scheduler, 2, config=SAMPLER, progress=False, conditioning=other)
    difference = (images - reference).abs().mean()
    assert difference < 5e-2 and difference * 10 < (otherwise - reference).abs().mean()


def test_requantized_8bit_weights_are_symmetric_int8(text_w8a8, schedule, tmp_path):
    path = export_onnx(text_w8a8, tmp_path / "fast.onnx", schedule=schedule, exact_convs=True,
                       requantize_weights=True)
    engine = OnnxUNet(path, threads=1)
    assert engine.info.details["uint8_weights"] == 0 and engine.info.details["int8_weights"] > 0
    errors = engine_vs_fake_quant(engine, text_w8a8, schedule, tokens=2)
    assert EXACT_TOLERANCE < statistics.median(errors) and max(errors) < INTEGER_TOLERANCE


def test_symmetric_8bit_weights_are_exact_int8(calibration, schedule, tmp_path):
    model = quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=8, weight_init="symmetric", fsc_scope="temporal"),
                     calibration, progress=False)
    engine = OnnxUNet(export_onnx(model, tmp_path / "symmetric.onnx", exact_convs=True), threads=1)
    assert engine.info.details["uint8_weights"] == 0 and engine.info.details["int8_weights"] > 0
    assert_exact(engine, model, schedule)  # no requantization: the fast kernels' weights are the model's


def test_a_graph_correction_covers_every_calibrated_step(calibration, scheduler, schedule, tmp_path):
    model = quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=8, fsc_scope="temporal", output_correction=True),
                     calibration, progress=False)
    inputs = iter(trajectory_inputs(model, scheduler, SAMPLER, num_images=2))  # read twice: a list is made
    engine = OnnxUNet(export_onnx(model, tmp_path / "integer.onnx", calibration=inputs), threads=1)
    assert engine.info.details["correction_graph_error_steps"] == len(schedule)
    exact = OnnxUNet(export_onnx(model, tmp_path / "exact.onnx", exact_convs=True), threads=1)
    assert exact.info.details["correction_graph_error_steps"] == 0  # no grids, no calibration: nothing added


@pytest.mark.parametrize("make_unet", [pixel_unet, text_unet])
def test_fp32_graph_matches_torch_at_any_timestep(make_unet, tmp_path):
    unet = make_unet()
    engine = OnnxUNet(export_onnx(unet, tmp_path / "fp32.onnx", format="fp32"), threads=1)
    inputs = {**unet_inputs(unet, 3, 0), "timestep": torch.tensor([3, 500, 999])}
    with torch.no_grad():
        reference = unet(**inputs).sample
    assert engine.info.schedule is None
    assert max(relative_errors(engine(**inputs).sample, reference)) < EXACT_TOLERANCE  # no rounding: no flips


def test_export_refuses_what_it_cannot_serve(pixel_w4a8, schedule, calibration, tmp_path):
    with pytest.raises(TfmqError, match="never quantized"):
        export_onnx(pixel_unet(), tmp_path / "a.onnx", schedule=schedule)
    with pytest.raises(TfmqError, match="is quantized"):
        export_onnx(pixel_w4a8, tmp_path / "a.onnx", format="fp32")
    with pytest.raises(TfmqError, match="opset 12 is not supported"):
        export_onnx(pixel_w4a8, tmp_path / "a.onnx", opset=12)
    with pytest.raises(TfmqError, match="unknown export format"):
        export_onnx(pixel_w4a8, tmp_path / "a.onnx", format="int4")
    with pytest.raises(TfmqError, match="differs from the one"):
        export_onnx(pixel_w4a8, tmp_path / "a.onnx", schedule=schedule[:-1])
    with pytest.raises(TfmqError, match="calibration inputs"):
        export_onnx(pixel_w4a8, tmp_path / "a.onnx")
    for integer_option in ({"exact_convs": "*conv1"}, {"requantize_weights": True}):
        with pytest.raises(TfmqError, match="format 'fp32' has neither"):
            export_onnx(pixel_unet(), tmp_path / "a.onnx", format="fp32", **integer_option)
    all_scales = quantize(pixel_unet(), RTNConfig(w_bits=4, a_bits=8, fsc_scope="all"), calibration, progress=False)
    with pytest.raises(TfmqError, match="constant scales"):
        export_onnx(all_scales, tmp_path / "a.onnx", exact_convs=True)
    assert not (tmp_path / "a.onnx").exists()


def test_export_without_onnx_is_a_clear_error(pixel_w4a8, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(TfmqError, match="onnx cannot be imported"):
        export_onnx(pixel_w4a8, tmp_path / "a.onnx", exact_convs=True)


def test_an_export_replaces_its_own_data_file_and_no_other(pixel_w4a8, tmp_path):
    path, data_file = tmp_path / "unet.onnx", tmp_path / "unet.onnx.data"
    data_file.write_bytes(b"not tfmq's")
    with pytest.raises(TfmqError, match="unet.onnx.data exists and was not written by tfmq"):
        export_onnx(pixel_w4a8, path, exact_convs=True, external_data_threshold_bytes=0)
    assert data_file.read_bytes() == b"not tfmq's" and not path.exists()
    export_onnx(pixel_w4a8, path, exact_convs=True, external_data_threshold_bytes=0, overwrite=True)
    assert OnnxUNet(path, threads=1).files == [path, data_file]
    # no overwrite needed now: the data file is the tfmq graph's; inline, it goes with the graph it served
    export_onnx(pixel_w4a8, path, exact_convs=True)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["unet.onnx"]
    assert OnnxUNet(path, threads=1).files == [path]


def test_a_schedule_free_graph_agrees_with_torch_at_timesteps_never_calibrated(calibration, scheduler, tmp_path):
    config = RTNConfig(w_bits=4, a_bits=8, fsc_scope="temporal", train_timesteps=scheduler.config.num_train_timesteps)
    model = quantize(pixel_unet(), config, calibration, progress=False)
    engine = OnnxUNet(export_onnx(model, tmp_path / "any.onnx", exact_convs=True), threads=1)
    assert engine.schedule_free and engine.info.schedule == list(range(scheduler.config.num_train_timesteps))
    never_calibrated = [t for t in (999, 640, 333, 37, 1) if t not in calibration.schedule.tolist()]
    assert_exact(engine, model, never_calibrated)
    # a fractional timestep takes the nearest integer's row in both
    inputs = unet_inputs(model, 2, 0)
    with torch.no_grad():
        assert torch.allclose(engine(inputs["sample"], 412.4).sample, model(inputs["sample"], 412.4).sample,
                              atol=1e-4)
    with pytest.raises(TfmqError, match=r"timestep 1000 is outside the training range 0\.\.999"):
        engine(inputs["sample"], 1000)
    # the graph serves other samplers than the one its calibration ran
    images = sample(engine, scheduler, 2, seed=1, config=SamplerConfig(name="dpm-solver", steps=7), progress=False)
    assert images.shape == (2, 3, 8, 8) and bool(torch.isfinite(images).all())


def test_a_graph_takes_the_output_correction_off_at_its_step(calibration, scheduler, tmp_path):
    config = RTNConfig(w_bits=4, a_bits=8, fsc_scope="temporal", output_correction=True,
                       train_timesteps=scheduler.config.num_train_timesteps)
    model = quantize(pixel_unet(), config, calibration, progress=False)
    # offsets far above float noise, different at every timestep, so a graph that dropped or misread them fails
    model.output_correction.offsets += torch.linspace(-1, 1, 1000)[:, None] * torch.tensor([1.0, -2.0, 0.5])
    engine = OnnxUNet(export_onnx(model, tmp_path / "corrected.onnx", exact_convs=True), threads=1)
    assert_exact(engine, model, [int(t) for t in calibration.schedule[:2]] + [640, 3])
    ops = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "corrected.onnx")).graph.node)
    assert ops["Sub"] >= 1 and ops["Gather"] >= 1


# Short value names keep a graph valid when an If branch reads a value of the graph around it (TorchScript's
# exporter writes a squeeze of a dynamic axis so).
def test_a_branch_reads_the_outer_value_under_its_new_name() -> None:
    doubled = helper.make_node("Add", ["x", "x"], ["/model/doubled_output_0"])
    condition = helper.make_node("Constant", [], ["/model/condition_output_0"],
                                 value=helper.make_tensor("c", TensorProto.BOOL, [], [True]))
    branch = helper.make_graph([helper.make_node("Identity", ["/model/doubled_output_0"], ["branch_out"])], "branch",
                               [], [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [2])])
    choose = helper.make_node("If", ["/model/condition_output_0"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([doubled, condition, choose], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _compact_value_names(model)
    onnx.checker.check_model(model)
    assert model.graph.node[0].output[0] == "v0"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": np.array([1.0, 2.0], np.float32)})[0], [2.0, 4.0])
