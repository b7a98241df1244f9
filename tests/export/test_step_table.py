"""The integer graph and the fake-quant torch model read their step tables at the same rows: at every step
index the graph gathers, from each block's table, exactly the temporal feature that the torch model's block
receives at that step's timestep, and not a neighbour's; its noise follows the matching timestep."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from tests.quant.tiny_unets import pixel_unet
from tfmq.export import export_onnx
from tfmq.export.metadata import SAMPLE, STEP
from tfmq.export.runtime import widen_uint4_weights
from tfmq.quant.nn.step_table import StepTable
from tfmq.quant.nn.temporal import install_temporal_cache, timestep_tables
from tfmq.quant.tib import find_tib


@pytest.fixture(scope="module", params=["fsc_tables", "feature_caches"])
def model(request, pixel_w4a8) -> nn.Module:
    """W4A8 with FSC tables on the TIB, or a copy whose blocks read temporal feature caches (the
    full-precision features, so they differ from the FSC path's) and skip the time MLP."""
    if request.param == "fsc_tables":
        return pixel_w4a8
    cached = copy.deepcopy(pixel_w4a8)
    schedule = timestep_tables(cached).schedule
    tib = find_tib(pixel_unet())
    with torch.no_grad():
        features = tib.temporal_features(schedule)
    steps = len(schedule)
    caches = {resnet: StepTable(features[name], torch.ones(steps), torch.zeros(steps))
              for resnet, name in zip(tib.resnets, tib.feature_names)}
    assert install_temporal_cache(cached, schedule, caches)
    return cached


@pytest.fixture(scope="module")
def session_and_tables(model, tmp_path_factory) -> tuple[onnxruntime.InferenceSession, list[str]]:
    """A session of the exact graph whose outputs are the noise and every step-table Gather; the names of
    those Gathers' tables."""
    path = export_onnx(model, tmp_path_factory.mktemp("step_table") / "exact.onnx", exact_convs=True)
    graph_model = onnx.load(str(path))
    widen_uint4_weights(graph_model, onnx)
    graph = graph_model.graph
    steps = len(timestep_tables(model).schedule)
    tables = {tensor.name for tensor in graph.initializer if len(tensor.dims) == 2 and tensor.dims[0] == steps}
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in tables]
    for node in gathers:
        graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, [node.input[0] for node in gathers]


def torch_features(model: nn.Module, sample: torch.Tensor, timestep: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The noise of the fake-quant model at `timestep`, and what each block's `time_emb_proj` served."""
    served = []
    handles = [model.get_submodule(name).register_forward_hook(lambda _m, _a, output: served.append(output[0]))
               for name in find_tib(model).feature_names]
    try:
        with torch.no_grad():
            noise = model(sample, timestep).sample
    finally:
        for handle in handles:
            handle.remove()
    return noise, served


def test_the_graph_gathers_at_each_step_the_rows_the_torch_model_serves_at_its_timestep(
    model: nn.Module, session_and_tables: tuple[onnxruntime.InferenceSession, list[str]]
) -> None:
    session, table_names = session_and_tables
    schedule = timestep_tables(model).schedule.tolist()
    blocks = len(find_tib(model).resnets)
    assert len(table_names) == blocks  # one table per block, each read by one Gather
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    # batch 1, as the tables were computed: a matmul's last bit may depend on the batch size
    reference = [torch_features(model, sample, timestep) for timestep in schedule]
    noise_errors, shifted_errors = [], []
    for step in range(len(schedule)):
        noise, *gathered = session.run(None, {SAMPLE: sample.numpy(), STEP: np.array(step, dtype=np.int64)})
        served = reference[step][1]
        matched = set()  # the graph's tables need not come in the blocks' order; a row is one step's, unbatched
        for row in gathered:
            matching = [block for block in range(blocks)
                        if row.shape == (served[block].numel(),) and np.array_equal(row, served[block].numpy())]
            assert len(matching) == 1, (step, matching)
            matched.add(matching[0])
            for neighbour in {max(step - 1, 0), min(step + 1, len(schedule) - 1)} - {step}:  # an off-by-one
                assert not np.array_equal(row, reference[neighbour][1][matching[0]].numpy()), (step, neighbour)
        assert matched == set(range(blocks)), step
        noise = torch.from_numpy(noise)
        shifted = reference[step + 1 if step + 1 < len(schedule) else step - 1][0]
        noise_errors.append(float((noise - reference[step][0]).norm() / reference[step][0].norm()))
        shifted_errors.append(float((noise - shifted).norm() / shifted.norm()))
    assert max(noise_errors) < 1e-3, noise_errors
    assert min(shifted_errors) > 10 * max(noise_errors), (shifted_errors, noise_errors)

