"""tfmq: post-training quantization of diffusion models, by the TFMQ-DM method.

    import tfmq
    model = tfmq.load_model("fashion-ddpm")          # or a local diffusers-layout folder
    images = tfmq.sample(model.unet, model.scheduler, num_images=64, seed=0)
"""

from tfmq.errors import TfmqError
from tfmq.metrics import QualityMetrics
from tfmq.models.loading import DiffusionModel, load_model
from tfmq.sampling import SamplerConfig, sample

__version__ = "0.1.0"
__all__ = ["DiffusionModel", "QualityMetrics", "SamplerConfig", "TfmqError", "load_model", "sample"]
