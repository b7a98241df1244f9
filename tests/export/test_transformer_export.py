"""The integer export of a diffusion transformer (DiT): the time MLPs become step tables, the modulation
Linears (which read the label too) stay in the graph with their FSC grids read per step, and onnxruntime
then computes what the fake-quant transformer computes, at every step and label, and inside the sampler."""

from __future__ import annotations

import onnx
import pytest
import torch

from tests.export.conftest import SAMPLER, assert_exact_but_for_flips
from tests.quant.tiny_unets import tiny_dit, tiny_pixart
from tfmq.errors import TfmqError
from tfmq.export import OnnxUNet, export_onnx
from tfmq.models.architectures import latent_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import RTNConfig, TFMQConfig
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.sampling import Conditioning, distinct_timesteps, sample, sampling_timesteps

CLASSES = 3
# The linears run as integer matmuls with exact float outputs: the graph differs from the fake-quant model by
# float summation order, which moves a code across a rounding boundary now and then (measured on these tiny
# transformers: 4e-7 to 6e-7 over a whole guided sampling run; one call of six 3.5e-4 on an AVX-512 CPU, where
# the summation order differs from the AVX2 one's). A call without a flip is exact to float rounding.
EXACT_TOLERANCE = 1e-5
RUN_TOLERANCE = 1e-3


def _labels(count: int) -> Conditioning:
    return Conditioning({"class_labels": torch.arange(count) % CLASSES}, {"class_labels": torch.tensor([CLASSES])},
                        guidance_scale=2.0)


@pytest.fixture(scope="module")
def calibration():
    return collect_calibration(tiny_dit(num_classes=CLASSES), latent_scheduler(), 2, SAMPLER, 1, progress=False,
                               conditioning=_labels(2))


@pytest.fixture(scope="module", params=["rtn_w8a8", "tfmq_w4a8_cache"])
def quantized(request, calibration):
    """RTN W8A8 with FSC tables on the whole TIB (the time MLPs' grids per step), or TFMQ W4A8 whose time MLPs
    are temporal feature caches."""
    config = (RTNConfig(w_bits=8, a_bits=8, fsc_scope="temporal") if request.param == "rtn_w8a8" else
              TFMQConfig(w_bits=4, a_bits=8, recon_preset="fast", recon_weight_iters=2, recon_act_iters=1,
                         temporal_cache=True))
    return quantize(tiny_dit(num_classes=CLASSES), config, calibration, progress=False)


@pytest.fixture(scope="module")
def graph(quantized, tmp_path_factory):
    schedule = distinct_timesteps(sampling_timesteps(latent_scheduler(), SAMPLER))
    return export_onnx(quantized, tmp_path_factory.mktemp("dit") / "dit.onnx", schedule=schedule)


def _relative(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


def test_every_step_and_label_gives_the_fake_quant_noise(quantized, graph):
    engine = OnnxUNet(graph, threads=1)
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, CLASSES])  # every class and the null label
    errors = []
    with torch.no_grad():
        for timestep in engine.info.schedule:
            inputs = {"sample": torch.randn(4, 4, 8, 8, generator=generator), "timestep": torch.full((4,), timestep),
                      "class_labels": labels}
            reference = quantized(inputs["sample"], timestep=inputs["timestep"], class_labels=labels).sample
            errors.append(_relative(engine(**inputs).sample, reference))
    assert_exact_but_for_flips(errors, EXACT_TOLERANCE, RUN_TOLERANCE)


def test_the_time_mlps_are_tables_and_the_modulations_read_their_grids_per_step(quantized, graph):
    model = onnx.load(str(graph))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    steps = len(OnnxUNet(graph, threads=1).info.schedule)
    width = quantized.config.num_attention_heads * quantized.config.attention_head_dim
    time_tables = [name for name, tensor in initializers.items() if list(tensor.dims) == [steps, width]]
    assert len(time_tables) == quantized.config.num_layers  # one time MLP per block
    constants = {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    step_grids = [node for node in model.graph.node if node.op_type == "QuantizeLinear"
                  and node.input[1] not in initializers and node.input[1] not in constants]
    table_quantizers = [name for name, module in quantized.named_modules()
                        if isinstance(module, UniformQuantizer) and module.has_timestep_table
                        and ".timestep_embedder." not in name]
    assert sorted(table_quantizers) == ["proj_out_1.input_quantizer",
                                        "transformer_blocks.0.norm1.linear.input_quantizer",
                                        "transformer_blocks.1.norm1.linear.input_quantizer"]
    assert len(step_grids) == len(table_quantizers)


def test_guided_sampling_on_onnxruntime_follows_the_fake_quant_transformer(quantized, graph):
    engine = OnnxUNet(graph, threads=1)
    run = {"config": SAMPLER, "progress": False, "seed": 5, "conditioning": _labels(3)}
    assert _relative(sample(engine, latent_scheduler(), 3, **run), sample(quantized, latent_scheduler(), 3, **run)) \
        < RUN_TOLERANCE


def test_the_full_precision_graph_serves_any_timestep_and_label(tmp_path):
    model = tiny_dit(num_classes=CLASSES)
    engine = OnnxUNet(export_onnx(model, tmp_path / "fp32.onnx", format="fp32"), threads=1)
    assert not model.training  # the exporter puts back the mode it found (a DiT drops labels in training)
    inputs = {"sample": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
              "timestep": torch.tensor([999, 500, 3]), "class_labels": torch.tensor([2, CLASSES, 0])}
    with torch.no_grad():
        reference = model(inputs["sample"], timestep=inputs["timestep"], class_labels=inputs["class_labels"]).sample
    assert _relative(engine(**inputs).sample, reference) < 1e-5


@pytest.mark.parametrize(("labels", "fragment"), [
    (None, "class-conditional: pass class_labels"),
    (torch.tensor([CLASSES + 1]), f"class label {CLASSES + 1} is outside 0..{CLASSES}"),
    (torch.tensor([-1]), "class label -1 is outside"),
])
def test_bad_labels_are_clear_errors(graph, labels, fragment):
    engine = OnnxUNet(graph, threads=1)
    with pytest.raises(TfmqError, match=fragment):
        engine(torch.zeros(1, 4, 8, 8), engine.info.schedule[0], class_labels=labels)


def test_a_pixart_transformer_is_refused_in_one_line(tmp_path):
    with pytest.raises(TfmqError, match="export takes a diffusers .*DiTTransformer2DModel; not a PixArtTransformer2DModel"):
        export_onnx(tiny_pixart(), tmp_path / "pixart.onnx", format="fp32")
    assert not (tmp_path / "pixart.onnx").exists()
