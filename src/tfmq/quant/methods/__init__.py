"""The PTQ methods: each a config type (`tfmq.quant.config`) with a handler registered for it
(`registry.register_method`) that turns a wrapped model plus calibration data into a calibrated one."""

from tfmq.quant.methods import qdiff, rtn, tfmq  # noqa: F401  (each registers its handler)
