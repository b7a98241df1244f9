"""Original single-file Stable Diffusion v1 checkpoints (`.ckpt` / `.safetensors` in the CompVis layout), read
offline with a local folder of the pipeline's diffusers configs.

The file holds the weights, the folder says what to build: `model_index.json`, `unet/`, `vae/` and
`text_encoder/` configs, the tokenizer files and the scheduler config (a diffusers repository of the model
without its weight files is such a folder). The weights are renamed by diffusers' single-file converters and
loaded strictly: diffusers' own loader keeps a network's random initialisation for any weight the file lacks
(without `accelerate`), and a partly random model must fail loudly here instead.

A `.ckpt` is a pickle: it is read with `torch.load(weights_only=True)` only, so a file that needs any other
Python object to unpickle is refused, never executed; the refusal names that object, from torch's message
or, for a pickle torch cannot parse at all (`pickle.dump`'s protocol 4 and 5), from the pickle's opcodes,
read without running any of them.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from tfmq.errors import TfmqError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
SUPPORTED_LAYOUT = "StableDiffusionPipeline"
UNET_KEY = "model.diffusion_model."
AUTOENCODER_KEY = "first_stage_model."
CLIP_KEY = "cond_stage_model.transformer."
OPEN_CLIP_KEY = "cond_stage_model.model."  # Stable Diffusion 2: not read
# torch names the global it refused as "Unsupported global: GLOBAL m.f ..." or "unsupported GLOBAL m.f whose
# module m is blocked" (os.system, builtins.eval, ...).
_REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")
_STRING_OPCODES = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                   "SHORT_BINSTRING")
_GET_OPCODES = ("GET", "BINGET", "LONG_BINGET")
_PUT_OPCODES = ("PUT", "BINPUT", "LONG_BINPUT")


def _globals_in(stream: BinaryIO) -> Iterator[str]:
    """The `module.name` of each global a pickle stream imports, from its opcodes alone: a protocol 4+
    STACK_GLOBAL takes the two strings pushed (or fetched from the memo) just before it."""
    strings: deque[str | None] = deque(maxlen=2)
    memo: dict[int, str | None] = {}
    top: str | None = None  # the last value pushed, when it is a string
    for opcode, argument, _ in pickletools.genops(stream):
        name = opcode.name
        if name == "GLOBAL":
            yield argument.replace(" ", ".")
        elif name == "STACK_GLOBAL" and len(strings) == 2 and None not in strings:
            yield ".".join(strings)
        if name == "MEMOIZE" or name in _PUT_OPCODES:
            memo[len(memo) if name == "MEMOIZE" else argument] = top
            continue
        top = memo.get(argument) if name in _GET_OPCODES else argument if name in _STRING_OPCODES else None
        if name in _GET_OPCODES or name in _STRING_OPCODES:
            strings.append(top)


@contextmanager
def _pickle_stream(path: Path) -> Iterator[BinaryIO]:
    """A checkpoint's pickle: the file itself, or the data.pkl inside torch.save's zip format."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as stream:
            yield stream
        return
    with zipfile.ZipFile(path) as archive:
        member = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
        with archive.open(member) if member is not None else io.BytesIO() as stream:
            yield stream


def _needed_globals(path: Path, error: pickle.UnpicklingError) -> list[str]:
    """The Python objects a pickled checkpoint imports that torch's weights-only unpickler refused."""
    refused = _REFUSED_GLOBAL.search(str(error))
    if refused is not None:
        return [refused.group(1)]
    found: list[str] = []
    try:
        with _pickle_stream(path) as stream:
            for name in _globals_in(stream):
                found.append(name)
    except Exception:  # a broken stream: the globals read up to the break are still what it needs
        pass
    return list(dict.fromkeys(found))


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a single-file checkpoint (unwrapping the `state_dict` entry of a training
    checkpoint), loaded onto the CPU without unpickling anything but tensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns before it fails on pickle.dump's newer protocols
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        needed = _needed_globals(path, exc)
        if not needed:
            raise TfmqError(f"cannot read {path} as a checkpoint: it is no torch or safetensors file") from exc
        names = ", ".join(needed[:8]) + (", ..." if len(needed) > 8 else "")
        raise TfmqError(
            f"{path} needs the Python object{'s' if len(needed) > 1 else ''} {names} to unpickle; tfmq unpickles "
            ".ckpt files with torch.load(weights_only=True) only, which runs no code. Use the model's "
            ".safetensors release, or re-save its state dict from a session you trust") from exc
    except Exception as exc:  # safetensors and torch raise their own errors for truncated or foreign files
        raise TfmqError(f"cannot read {path} as a checkpoint: {str(exc).splitlines()[0]}") from exc
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not any(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise TfmqError(f"{path} holds no state dict of tensors")
    return checkpoint


def check_stable_diffusion_v1(checkpoint: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse files that are not a whole Stable Diffusion v1 model before building anything."""
    if any(key.startswith(OPEN_CLIP_KEY) for key in checkpoint):
        raise TfmqError(f"{path} has an OpenCLIP text encoder (Stable Diffusion 2.x); tfmq reads Stable Diffusion "
                        "v1 single files only: convert it to a diffusers folder and pass the folder")
    for name, prefix in (("UNet", UNET_KEY), ("autoencoder", AUTOENCODER_KEY), ("CLIP text encoder", CLIP_KEY)):
        if not any(key.startswith(prefix) for key in checkpoint):
            raise TfmqError(f"{path} has no {name} weights ({prefix}*): not a whole Stable Diffusion v1 checkpoint")


def converted_state(name: str, network: nn.Module, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of pipeline component `name` under diffusers' names, by diffusers' single-file converters."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    if name == "unet":
        return convert_ldm_unet_checkpoint(checkpoint, dict(network.config))
    if name == "vae":
        return convert_ldm_vae_checkpoint(checkpoint, dict(network.config))
    state = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(network, "text_model"):  # transformers >= 5.6 has no `text_model.` level in CLIPTextModel
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    return state


def load_network(name: str, network_class: type, config_folder: Path, checkpoint: dict[str, torch.Tensor],
                 path: Path) -> nn.Module:
    """Component `name` built from its config in `config_folder`, every weight taken from `checkpoint`."""
    try:
        if hasattr(network_class, "load_config"):  # a diffusers model
            network = network_class.from_config(network_class.load_config(config_folder / name))
        else:  # a transformers model
            network = network_class(network_class.config_class.from_pretrained(
                config_folder / name, local_files_only=True, trust_remote_code=False))
    except Exception as exc:  # diffusers and transformers raise their own errors for missing or bad configs
        raise TfmqError(f"cannot build {name} from {config_folder / name}: {str(exc).splitlines()[0]}") from exc
    state = converted_state(name, network, checkpoint)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        raise TfmqError(
            f"{path} does not fit the {name} config in {config_folder / name}: "
            f"{len(missing)} weights missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} of another shape {wrong[:3]}")
    network.load_state_dict(state, strict=True)
    return network.eval().requires_grad_(False)
