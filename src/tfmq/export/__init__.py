"""Real low-bit inference: quantized UNets and DiTs as ONNX QDQ graphs that onnxruntime (or OpenVINO,
`graph_engine(path, "openvino")`) runs on integer kernels, or a quantized UNet compiled in the process onto
oneDNN's integer kernels (`CompiledUNet`, through torch.compile).

What a user needs here (`export_onnx`, `OnnxUNet`, `trajectory_inputs`) is also in `tfmq`. With `qunet`
quantized on `calibration` as in the `tfmq` package's example (`calibration.schedule` is the distinct
timesteps of `sampler`, the ones the graph will serve):

    tfmq.export_onnx(qunet, "unet.onnx", schedule=calibration.schedule,
                     calibration=tfmq.trajectory_inputs(qunet, model.scheduler, sampler))
    images = tfmq.sample(tfmq.OnnxUNet("unet.onnx"), model.scheduler, num_images=64, config=sampler)
"""

from tfmq.export.conv_outputs import trajectory_inputs
from tfmq.export.metadata import FORMATS, GraphInfo, owned_graph
from tfmq.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, export_onnx
from tfmq.arguments import GRAPH_ENGINES
from tfmq.export.compiled import CompiledUNet
from tfmq.export.runtime import ExportedGraph, OnnxUNet, graph_engine

__all__ = ["DEFAULT_OPSET", "FORMATS", "GRAPH_ENGINES", "SUPPORTED_OPSETS", "CompiledUNet", "ExportedGraph",
           "GraphInfo", "OnnxUNet", "export_onnx", "graph_engine", "owned_graph", "trajectory_inputs"]
