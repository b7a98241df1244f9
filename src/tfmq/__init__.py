"""tfmq: post-training quantization of diffusion models, by the TFMQ-DM method.

    import tfmq
    model = tfmq.load_model("fashion-ddpm")          # or a local diffusers-layout pipeline folder
    calibration = tfmq.collect_calibration(model.unet, model.scheduler)
    qunet = tfmq.quantize(model.unet, tfmq.QuantConfig(method="tfmq", w_bits=4, a_bits=8), calibration)
    images = tfmq.sample(qunet, model.scheduler, num_images=64, seed=0, decoder=model.decoder)
"""

from tfmq.errors import TfmqError
from tfmq.metrics import QualityMetrics
from tfmq.models.loading import DiffusionModel, load_model
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.config import QuantConfig
from tfmq.sampling import Conditioning, SamplerConfig, sample

__version__ = "0.1.0"
__all__ = ["Conditioning", "DiffusionModel", "QualityMetrics", "QuantConfig", "SamplerConfig", "TfmqError",
           "collect_calibration", "load_model", "load_quantized", "quantize", "sample", "save_quantized"]
