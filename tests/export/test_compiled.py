import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from tests.export.conftest import assert_exact_but_for_flips
from tests.export.test_onnx_export import EXACT_TOLERANCE, FLIP_TOLERANCE, relative_errors
from tests.quant.tiny_unets import pixel_unet, unet_inputs
from tfmq.errors import TfmqError
from tfmq.export import CompiledUNet
from tfmq.export.compiled import CompiledConv2d, CompiledLinear, DecomposedWeight
from tfmq.export.norms import ChannelMomentsGroupNorm
from tfmq.quant.nn import timestep_tables
from tfmq.quant.provenance import Provenance
from tfmq.quant.config import RTNConfig


def integer_kernels(engine: CompiledUNet) -> dict[str, int]:
    """How many oneDNN integer convs and linears the engine's layers should lower to: one conv per input part."""
    convs = linears = 0
    for module in engine.graph.modules():
        weight = getattr(module, "weight", None)
        integer = isinstance(weight, DecomposedWeight) and weight.codes.dtype == torch.int8
        if isinstance(module, CompiledConv2d) and integer:
            convs += 1 if module.parts is None else 2
        elif isinstance(module, CompiledLinear) and integer:
            linears += 1
    return {"qconv_unary_lower_count": convs, "qlinear_unary_lower_count": linears}


@torch.no_grad()
def engine_errors(engine: CompiledUNet, model, schedule: list[int], text: bool = False,
                  batch: int = 3) -> list[float]:
    """Relative errors against the fake-quant model, per sample, one call per scheduled timestep."""
    errors = []
    for index, timestep in enumerate(schedule):
        inputs = {**unet_inputs(model, batch, index), "timestep": torch.full((batch,), timestep)}
        if text:
            inputs["encoder_hidden_states"] = torch.randn(batch, 5, model.config.cross_attention_dim,
                                                          generator=torch.Generator().manual_seed(index))
        errors += relative_errors(engine(**inputs).sample, model(**inputs).sample)
    return errors


def test_the_compiled_engine_runs_every_quantized_layer_on_integer_kernels_and_computes_the_fake_quant_model(
        pixel_w4a8):
    engine = CompiledUNet(pixel_w4a8)  # the schedule of its timestep tables
    schedule = timestep_tables(pixel_w4a8).schedule.tolist()
    counters.clear()
    errors = engine_errors(engine, pixel_w4a8, schedule)
    lowered = {name: counters["inductor"][name] for name in ("qconv_unary_lower_count", "qlinear_unary_lower_count")}
    expected = integer_kernels(engine)
    # split shortcut convs run as two integer convs, and no conv needs an output grid: exact but for flips
    assert expected["qconv_unary_lower_count"] > len([m for m in engine.graph.modules() if isinstance(m, CompiledConv2d)
                                                      and m.parts is None and isinstance(m.weight, DecomposedWeight)])
    assert lowered == expected
    # every call after the first ran with Dynamo's guards cut to those that tell compiled graphs apart
    assert_exact_but_for_flips(errors, EXACT_TOLERANCE, FLIP_TOLERANCE)
    norms = [type(module) for module in engine.graph.modules() if isinstance(module, (nn.GroupNorm,
                                                                                      ChannelMomentsGroupNorm))]
    assert norms and set(norms) == {ChannelMomentsGroupNorm}


@pytest.mark.slow  # a second compile of a tiny UNet: 30-35 s on 2 cores (the CLI and README tests compile too)
def test_the_compiled_engine_runs_a_text_unet_with_its_states(text_w8a8, schedule):
    # 8-bit asymmetric weights: uint8 codes with zero points, which oneDNN's kernels do not take, run as float
    engine = CompiledUNet(text_w8a8, schedule[:2])
    assert engine.counts["uint8_weights"] > 0
    assert_exact_but_for_flips(engine_errors(engine, text_w8a8, schedule[:2], text=True), EXACT_TOLERANCE,
                               FLIP_TOLERANCE)
    # a batch of another size after the warm calls compiles anew rather than running the graph for 3
    assert_exact_but_for_flips(engine_errors(engine, text_w8a8, schedule[:1], text=True, batch=2),
                               EXACT_TOLERANCE, FLIP_TOLERANCE)
    with pytest.raises(TfmqError, match="text-conditional: pass encoder_hidden_states"):
        engine(torch.randn(1, 4, 8, 8), schedule[0])


def test_the_compiled_engine_refuses_what_it_cannot_serve(pixel_w4a8):
    schedule = timestep_tables(pixel_w4a8).schedule.tolist()
    engine = CompiledUNet(pixel_w4a8)
    sample = torch.randn(1, 3, 8, 8)
    unscheduled = next(t for t in range(1000) if t not in schedule)
    with pytest.raises(TfmqError, match=f"timestep {unscheduled} is not in the exported schedule"):
        engine(sample, unscheduled)
    with pytest.raises(TfmqError, match="one timestep per batch"):
        engine(torch.randn(2, 3, 8, 8), torch.tensor(schedule[:2]))
    with pytest.raises(TfmqError, match="takes no encoder_hidden_states"):
        engine(sample, schedule[0], torch.randn(1, 2, 8))
    with pytest.raises(TfmqError, match="differs from the one the model's timestep tables"):
        CompiledUNet(pixel_w4a8, schedule[1:])
    unquantized = pixel_unet()
    unquantized.tfmq_info = Provenance.of(RTNConfig(), unquantized)
    with pytest.raises(TfmqError, match="never quantized"):
        CompiledUNet(unquantized, schedule)
    with pytest.raises(TfmqError, match="takes a quantized diffusers UNet2DModel"):
        CompiledUNet(torch.nn.Linear(2, 2), schedule)
    with torch._inductor.config.patch({"cpp.cxx": ("tfmq-no-such-compiler",)}):
        with pytest.raises(TfmqError, match=r"install a C\+\+ compiler"):
            CompiledUNet(pixel_w4a8)
