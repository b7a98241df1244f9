"""Real low-bit inference: quantized UNets as ONNX QDQ graphs that onnxruntime runs on integer kernels.

    from tfmq.export import OnnxUNet, export_onnx, trajectory_inputs
    export_onnx(qunet, "unet.onnx", schedule=distinct_timesteps(sampling_timesteps(scheduler, sampler)),
                calibration=trajectory_inputs(qunet, scheduler, sampler))
    images = tfmq.sample(OnnxUNet("unet.onnx"), scheduler, 64, config=sampler)
"""

from tfmq.export.conv_outputs import trajectory_inputs
from tfmq.export.metadata import FORMATS, GraphInfo, owned_graph
from tfmq.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, export_onnx
from tfmq.export.runtime import OnnxUNet

__all__ = ["DEFAULT_OPSET", "FORMATS", "SUPPORTED_OPSETS", "GraphInfo", "OnnxUNet", "export_onnx", "owned_graph",
           "trajectory_inputs"]
