import json
import os
import sys

import pytest
import torch
from tests.conftest import tiny_unet
from tests.models.tiny_pipelines import write_pipeline

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
    with pytest.raises(TfmqError, match="has no unet/config.json"):
        load_model(tmp_path)


def test_folder_without_scheduler_is_an_error(tiny_model_folder):
    (tiny_model_folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(TfmqError, match="no scheduler config"):
        load_model(tiny_model_folder)


def test_corrupt_safetensors_is_an_error(tiny_model_folder):
    weights = tiny_model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TfmqError, match="cannot load UNet2DModel weights"):
        load_model(tiny_model_folder)


def test_other_model_class_is_an_error(tiny_model_folder):
    config_path = tiny_model_folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "UNet3DConditionModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(TfmqError, match="holds a UNet3DConditionModel; tfmq quantizes UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel"):
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


@pytest.mark.parametrize("relative", ["unet/config.json", "model_index.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe{\x00}", "cannot read .*codec can't decode"), (b'["a", "list"]', "is not a JSON object but a list"),
    (b'{"_class_name": ["module", "Custom"]}', r'names its class \["module", "Custom"\], not a class name')])
def test_config_files_that_are_not_json_objects_are_errors(tiny_model_folder, relative, content, fragment):
    (tiny_model_folder / relative).write_bytes(content)
    with pytest.raises(TfmqError, match=fragment) as raised:
        load_model(tiny_model_folder)
    assert "\n" not in str(raised.value)


def _custom_code_folder(tmp_path, class_name: str):
    """A tiny Stable Diffusion folder whose text encoder config asks for code shipped in the folder."""
    folder = write_pipeline("text", tmp_path / "custom")
    marker = tmp_path / "custom-code-ran"
    for module in ("modeling_custom", "configuration_custom"):
        (folder / "text_encoder" / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "custom"  # unknown to transformers: only the folder's code could build it
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    config_path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", class_name]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, marker


@pytest.mark.parametrize("class_name, fragment", [
    ("AutoModel", "names transformers.AutoModel for text_encoder, which tfmq cannot load"),
    ("CLIPTextModel", r"config.json asks for custom code \(auto_map\); tfmq never runs code from a model folder")])
def test_a_folder_asking_for_custom_code_is_refused_without_prompting(tmp_path, monkeypatch, class_name, fragment):
    folder, marker = _custom_code_folder(tmp_path, class_name)
    closed = open(os.devnull)
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "y")
    with pytest.raises(TfmqError, match=fragment):
        load_model(folder)
    assert prompts == [] and not marker.exists()


def test_transformers_components_are_loaded_with_trust_remote_code_false(tmp_path, monkeypatch):
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    seen = []
    for base in (PreTrainedModel, PreTrainedTokenizerBase):
        def recording(cls, *args, original=base.from_pretrained.__func__, **kwargs):
            seen.append((cls.__name__, kwargs.get("trust_remote_code", "not passed")))
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(base, "from_pretrained", classmethod(recording))
    load_model(write_pipeline("text", tmp_path / "sd"))
    assert sorted(seen) == [("CLIPTextModel", False), ("TokenizersBackend", False)]


@pytest.mark.parametrize("entry, fragment", [
    ("a string", r'gives vqvae as "a string", not \["library", "ClassName"\]'),
    (["diffusers", "AutoencoderKL", "extra"], "gives vqvae as"),
    (["diffusers", "DDPMPipeline"], "names diffusers.DDPMPipeline for vqvae, which tfmq cannot load"),
    (["diffusers", "AutoModel"], "names diffusers.AutoModel for vqvae, which tfmq cannot load")])
def test_malformed_or_code_running_index_entries_are_errors(tmp_path, entry, fragment):
    folder = write_pipeline("latent", tmp_path / "ldm")
    index = json.loads((folder / "model_index.json").read_text())
    index["vqvae"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TfmqError, match=fragment):
        load_model(folder)


@pytest.mark.parametrize("bare, fragment", [(False, "cannot load scheduler from .*scheduler: linspace"),
                                            (True, "cannot build the noise schedule of .*scheduler_config.json")])
def test_a_scheduler_config_diffusers_cannot_build_is_an_error(tiny_model_folder, bare, fragment):
    if bare:  # a unet/ + scheduler/ folder: no pipeline loads the scheduler first
        (tiny_model_folder / "model_index.json").unlink()
    path = tiny_model_folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["num_train_timesteps"] = "many"
    path.write_text(json.dumps(config))
    with pytest.raises(TfmqError, match=fragment):
        load_model(tiny_model_folder)


def test_shipped_models_load_and_sample_without_opening_a_network_connection(monkeypatch):
    import socket

    from tfmq.models.loading import ZOO_MODELS, load_model
    from tfmq.sampling import SamplerConfig, sample

    def refuse(*args, **kwargs):
        raise AssertionError(f"tfmq tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ZOO_MODELS:
        model = load_model(name)
        conditioning = None if model.conditioning_kind is None else model.conditioning(
            1, prompts=model.calibration_prompts()[:1] if model.conditioning_kind == "text" else None)
        images = sample(model.unet, model.scheduler, 1, config=SamplerConfig(steps=2), progress=False,
                        conditioning=conditioning, decoder=model.decoder)
        assert images.shape[0] == 1
