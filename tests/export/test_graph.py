import copy

import torch

from tests.export.conftest import SAMPLER
from tests.quant.tiny_unets import pixel_unet
from tfmq.export import trajectory_inputs
from tfmq.export.conv_outputs import conv_output_grids, integer_conv_names
from tfmq.export.graph import add_graph_error, integer_twin
from tfmq.quant.api import quantize
from tfmq.quant.config import RTNConfig
from tfmq.quant.nn.temporal import timestep_tables


@torch.no_grad()
def test_the_graph_correction_takes_off_the_mean_error_of_the_output_grids(calibration, scheduler):
    model = quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=8, fsc_scope="temporal", output_correction=True),
                     calibration, progress=False)
    schedule = timestep_tables(model).schedule.cpu()
    row_of = {int(timestep): row for row, timestep in enumerate(schedule.tolist())}
    inputs = trajectory_inputs(model, scheduler, SAMPLER, num_images=4)
    grids = conv_output_grids(model, integer_conv_names(model), inputs)

    def mean_errors(graph) -> torch.Tensor:
        """(calls, channels): the twin's mean noise less the fake-quant model's, one call per step."""
        return torch.stack([
            (graph(call["sample"], torch.tensor(row_of[int(call["timestep"].reshape(-1)[0])]))
             - model(**call).sample).mean(dim=(0, 2, 3)) for call in inputs])

    model_offsets = model.output_correction.offsets.clone()
    graph, _ = integer_twin(model, schedule, grids, None)
    before = mean_errors(graph)
    assert before.abs().max() > 1e-4  # the output grids move the mean: something to take off
    assert add_graph_error(graph, model, schedule, inputs) == len(schedule)
    assert mean_errors(graph).abs().max() < 1e-2 * before.abs().max()
    assert torch.equal(model.output_correction.offsets, model_offsets)  # the graph's copy changed, not the model's
    uncorrected = copy.deepcopy(model)
    del uncorrected.output_correction
    plain, _ = integer_twin(uncorrected, schedule, grids, None)
    assert add_graph_error(plain, uncorrected, schedule, inputs) == 0 and plain.correction is None
