import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.models.original_checkpoint import TEXT_ENCODER_PREFIX, UNET_PREFIX, config_folder, single_file_model
from tests.models.tiny_pipelines import write_pipeline

from tfmq.errors import TfmqError
from tfmq.models.loading import load_model


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = write_pipeline("text", tmp_path_factory.mktemp("single-file") / "tiny-sd")
    return folder, *single_file_model(folder, folder.parent / "released")


def _networks(model) -> dict[str, torch.nn.Module]:
    return {"unet": model.unet, "vae": model.components["vae"], "text_encoder": model.components["text_encoder"]}


def _assert_same_weights(loaded, expected) -> None:
    for name, network in _networks(expected).items():
        state, loaded_state = network.state_dict(), _networks(loaded)[name].state_dict()
        assert loaded_state.keys() == state.keys(), name
        assert all(torch.equal(loaded_state[key], state[key]) for key in state), name


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_every_network_weight_from_the_file(tiny_sd, tmp_path, monkeypatch, suffix):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _, _ = tiny_sd
    path, configs = single_file_model(folder, tmp_path, suffix)
    assert not list(configs.rglob("*.safetensors"))  # the weights can only come from the file
    model = load_model(path, config=configs)
    _assert_same_weights(model, load_model(folder))
    assert model.layout == "StableDiffusionPipeline" and model.conditioning_kind == "text"
    assert type(model.components["scheduler"]).__name__ == "PNDMScheduler"
    assert model.reference == {"source": str(path.resolve()), "config": str(configs.resolve())}
    assert load_model(folder).reference == {"source": str(folder.resolve())}


def test_shipped_text_model_round_trips_through_a_single_file(tmp_path):
    from tfmq.models.loading import ZOO_DIR

    path, configs = single_file_model(ZOO_DIR / "fashion-cond", tmp_path)
    model, shipped = load_model(path, config=configs), load_model("fashion-cond")
    _assert_same_weights(model, shipped)
    assert model.calibration_prompts() == shipped.calibration_prompts()  # read from the config folder
    with torch.no_grad():
        prompts = model.encode_prompts(["a photo of a sneaker"])
        assert torch.equal(prompts, shipped.encode_prompts(["a photo of a sneaker"]))
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        # bit-identical weights; the kernels may still round differently by where the tensors sit in memory
        torch.testing.assert_close(model.unet(x, t, encoder_hidden_states=prompts).sample,
                                   shipped.unet(x, t, encoder_hidden_states=prompts).sample, rtol=0, atol=1e-5)


CALLED = []


def _record_call() -> None:
    CALLED.append(True)


class _Payload:
    """Pickles as a call of `_record_call`: what a malicious .ckpt does with any function."""

    def __reduce__(self):
        return _record_call, ()


def test_ckpt_with_python_objects_is_refused_without_running_them(tiny_sd, tmp_path):
    _, path, configs = tiny_sd
    state = load_file(str(path))
    torch.save({"state_dict": state, "callbacks": _Payload()}, tmp_path / "model.ckpt")
    with pytest.raises(TfmqError, match=r"needs the Python object .*_record_call.*weights_only=True"):
        load_model(tmp_path / "model.ckpt", config=configs)
    assert not CALLED
    pickle.loads(pickle.dumps(_Payload()))  # the payload does run when unpickled without the guard
    assert CALLED


def test_missing_weight_is_an_error_not_a_random_initialisation(tiny_sd, tmp_path):
    _, path, configs = tiny_sd
    state = load_file(str(path))
    removed = next(key for key in state if key.startswith(UNET_PREFIX + "output_blocks."))
    del state[removed]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(TfmqError, match=r"unet config .* 1 weights missing"):
        load_model(tmp_path / "model.safetensors", config=configs)


def test_file_of_another_model_size_is_an_error(tiny_sd, tmp_path):
    _, path, configs = tiny_sd
    state = load_file(str(path))
    key = TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(TfmqError, match="1 of another shape"):
        load_model(tmp_path / "model.safetensors", config=configs)


@pytest.mark.parametrize("extra_key, fragment", [
    ("cond_stage_model.model.transformer.resblocks.0.ln_1.weight", "Stable Diffusion 2"),
    (None, "no CLIP text encoder weights"),
])
def test_files_that_are_not_stable_diffusion_v1_are_refused(tiny_sd, tmp_path, extra_key, fragment):
    _, path, configs = tiny_sd
    state = load_file(str(path))
    if extra_key is None:
        state = {key: value for key, value in state.items() if not key.startswith(TEXT_ENCODER_PREFIX)}
    else:
        state[extra_key] = torch.ones(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(TfmqError, match=fragment):
        load_model(tmp_path / "model.safetensors", config=configs)


def test_single_file_needs_a_stable_diffusion_config_folder(tiny_sd, tmp_path):
    folder, path, _ = tiny_sd
    with pytest.raises(TfmqError, match="--model-config"):
        load_model(path)
    with pytest.raises(TfmqError, match="has no model_index.json"):
        load_model(path, config=tmp_path)
    with pytest.raises(TfmqError, match="load as a StableDiffusionPipeline; .* DDPMPipeline"):
        load_model(path, config=write_pipeline("pixel", tmp_path / "ddpm"))
    with pytest.raises(TfmqError, match="goes with a single-file checkpoint"):
        load_model(folder, config=folder)
    configs = config_folder(folder, tmp_path / "no-unet")
    index = json.loads((configs / "model_index.json").read_text())
    del index["unet"]
    (configs / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TfmqError, match="model_index.json has no unet"):
        load_model(path, config=configs)


def test_unreadable_files_are_errors(tiny_sd, tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(TfmqError, match="not a checkpoint"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(TfmqError, match="cannot read .* as a checkpoint"):
        load_model(tmp_path / "broken.safetensors", config=tiny_sd[2])
    (tmp_path / "broken.ckpt").write_bytes(b"\x00" * 16)
    with pytest.raises(TfmqError, match="cannot read .* as a checkpoint"):
        load_model(tmp_path / "broken.ckpt", config=tiny_sd[2])


def test_half_precision_file_loads_into_float32_networks(tiny_sd, tmp_path):
    """Most released .safetensors hold fp16 weights; tfmq calibrates in float32."""
    folder, path, configs = tiny_sd
    half = {key: value.half() for key, value in load_file(str(path)).items()}
    save_file(half, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path / "model.safetensors", config=configs)
    expected = load_model(folder).unet.state_dict()
    loaded = model.unet.state_dict()
    assert all(tensor.dtype == torch.float32 for tensor in loaded.values())
    assert all(torch.equal(loaded[key], expected[key].half().float()) for key in expected)


class _SystemCall:
    """Pickles as os.system(...): the payload of a malicious .ckpt."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_ckpt_calling_os_system_is_refused_naming_the_call(tiny_sd, tmp_path, writer):
    _, path, configs = tiny_sd
    marker, ckpt = tmp_path / "ran", tmp_path / "model.ckpt"
    payload = {"state_dict": load_file(str(path)), "callbacks": _SystemCall(marker)}
    if writer == "torch.save":
        torch.save(payload, ckpt)
    else:
        with open(ckpt, "wb") as handle:
            pickle.dump(payload, handle)
    fragment = (rf"needs the Python objects? .*{os.system.__module__}\.system.* to unpickle; "
                r"tfmq unpickles .ckpt files with torch.load\(weights_only=True\) only")
    with pytest.raises(TfmqError, match=fragment) as raised:
        load_model(ckpt, config=configs)
    assert "\n" not in str(raised.value) and not marker.exists()


def test_plain_pickle_of_python_data_is_no_checkpoint(tiny_sd, tmp_path):
    with open(tmp_path / "model.ckpt", "wb") as handle:
        pickle.dump({"weights": [1.0, 2.0]}, handle)
    with pytest.raises(TfmqError, match="it is no torch or safetensors file"):
        load_model(tmp_path / "model.ckpt", config=tiny_sd[2])


def test_config_folder_configs_are_read_without_custom_code(tiny_sd, tmp_path, monkeypatch):
    from transformers import PretrainedConfig

    folder, path, _ = tiny_sd
    seen = []

    def recording(cls, *args, original=PretrainedConfig.from_pretrained.__func__, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "not passed"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PretrainedConfig, "from_pretrained", classmethod(recording))
    configs = config_folder(folder, tmp_path / "configs")
    load_model(path, config=configs)
    assert seen and set(seen) == {False}
    config_path = configs / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(TfmqError, match=r"text_encoder/config.json asks for custom code \(auto_map\)"):
        load_model(path, config=configs)
