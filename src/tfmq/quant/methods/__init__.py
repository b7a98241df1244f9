"""The PTQ methods: each turns a wrapped model plus calibration data into a calibrated quantized model."""
