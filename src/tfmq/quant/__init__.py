"""Fake quantization of diffusion UNets: method configs (`config`), runtime modules (`nn`), model wrapping
(`wrap`), calibration steps, the methods (`methods`) and checkpoints. The public names are in `tfmq`."""
