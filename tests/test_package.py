import torch
from tests.models.tiny_pipelines import write_pipeline

import tfmq


def test_the_top_level_api_runs_the_documented_flow_on_a_latent_model(tmp_path):
    torch.set_num_threads(1)
    model = tfmq.load_model(write_pipeline("latent", tmp_path / "ldm"))
    sampler = tfmq.SamplerConfig(steps=4)
    calibration = tfmq.collect_calibration(model.unet, model.scheduler, 2, sampler, 2, progress=False)
    config = tfmq.QuantConfig(method="tfmq", w_bits=8, a_bits=8, recon_weight_iters=2, recon_act_iters=1)
    qunet = tfmq.quantize(model.unet, config, calibration, progress=False)
    loaded = tfmq.load_quantized(tfmq.save_quantized(qunet, tmp_path / "q"), model.unet)
    images = tfmq.sample(loaded, model.scheduler, 2, config=sampler, progress=False, decoder=model.decoder)
    assert images.shape == (2, 1, 16, 16)


def test_importing_the_cli_does_not_import_torch():
    # the CLI sets OMP_WAIT_POLICY for onnxruntime before torch starts its OpenMP pool (measured: the
    # int8 engine ran 1.0x FP32 torch with spinning torch threads, 2.2x without)
    import subprocess
    import sys

    code = "import sys, tfmq, tfmq.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
