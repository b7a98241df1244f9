import json

import pytest
import torch
from tests.conftest import tiny_unet

from tfmq.errors import TfmqError
from tfmq.models.loading import ZOO_DIR, load_model


def test_diffusers_folder_loads_offline_with_identical_weights(tiny_model_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(tiny_model_folder)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t).sample, tiny_unet()(x, t).sample)
    assert model.scheduler.config.num_train_timesteps == 1000


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(TfmqError, match="neither a shipped model"):
        load_model(tmp_path / "nowhere")


def test_folder_without_unet_config_is_an_error(tmp_path):
    with pytest.raises(TfmqError, match="no UNet config"):
        load_model(tmp_path)


def test_folder_without_scheduler_is_an_error(tiny_model_folder):
    (tiny_model_folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(TfmqError, match="no scheduler config"):
        load_model(tiny_model_folder)


def test_corrupt_safetensors_is_an_error(tiny_model_folder):
    weights = tiny_model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TfmqError, match="cannot load UNet weights"):
        load_model(tiny_model_folder)


def test_other_model_class_is_an_error(tiny_model_folder):
    config_path = tiny_model_folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "UNet3DConditionModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(TfmqError, match="not a UNet2DModel or UNet2DConditionModel"):
        load_model(tiny_model_folder)


def test_shipped_fashion_ddpm_loads():
    assert (ZOO_DIR / "fashion-ddpm" / "MODEL_CARD.md").is_file()
    model = load_model("fashion-ddpm")
    assert model.unet.config.sample_size == 16 and model.unet.config.in_channels == 1
    assert model.scheduler.config.beta_schedule == "linear"
    assert 2_000_000 < sum(p.numel() for p in model.unet.parameters()) < 4_000_000


def test_shipped_latent_model_loads_with_its_autoencoder():
    model = load_model("fashion-ldm")
    assert model.layout == "LDMPipeline" and model.conditioning_kind is None
    assert model.unet.config.in_channels == 4 and model.unet.config.sample_size == 8
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = model.decode(latents)
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1
    assert (ZOO_DIR / "fashion-ldm" / "MODEL_CARD.md").is_file()


def test_shipped_text_model_loads_with_encoder_tokenizer_and_calibration_prompts():
    model = load_model("fashion-cond")
    assert model.layout == "StableDiffusionPipeline" and model.conditioning_kind == "text"
    prompts = model.calibration_prompts()
    assert len(prompts) == 128
    conditioning = model.conditioning(3, prompts=prompts[:2], guidance_scale=3.0)
    states = conditioning.per_image["encoder_hidden_states"]
    assert states.shape == (3, 16, 64) and torch.equal(states[0], states[2])
    assert not torch.equal(states[0], conditioning.unconditional["encoder_hidden_states"][0])
    assert (ZOO_DIR / "fashion-cond" / "MODEL_CARD.md").is_file()
