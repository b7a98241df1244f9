"""Stable Diffusion v1 single-file checkpoints (the original CompVis key layout) written from diffusers
components, so the tests can hand tfmq's single-file loader a file of the format users have.

The layout: the UNet under `model.diffusion_model.` (input_blocks / middle_block / output_blocks, each a
sequence of a ResBlock, a SpatialTransformer and a down- or upsampler), the autoencoder under
`first_stage_model.` (encoder.down.i.block.j, decoder.up counted from the bottom, 1x1-conv attention) and
the CLIP text encoder under `cond_stage_model.transformer.` with the transformers key names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

RESNET_LEAVES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
AUTOENCODER_RESNET_LEAVES = {"conv_shortcut": "nin_shortcut"}
AUTOENCODER_ATTENTION_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_modules(config) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module path -> (original module path, leaf renames) for a UNet2DConditionModel."""
    modules = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
               "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {})}
    levels, per_level = len(config.block_out_channels), config.layers_per_block
    index = 1
    for level in range(levels):
        for layer in range(per_level):
            modules[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", RESNET_LEAVES)
            modules[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    modules["mid_block.resnets.0"] = ("middle_block.0", RESNET_LEAVES)
    modules["mid_block.attentions.0"] = ("middle_block.1", {})
    modules["mid_block.resnets.1"] = ("middle_block.2", RESNET_LEAVES)
    index = 0
    for level, block_type in enumerate(config.up_block_types):
        for layer in range(per_level + 1):
            modules[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", RESNET_LEAVES)
            modules[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
            if layer == per_level and level < levels - 1:
                slot = 2 if "CrossAttn" in block_type else 1
                modules[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", {})
            index += 1
    return modules


def autoencoder_modules(config) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module path -> (original module path, leaf renames) for an AutoencoderKL."""
    modules = {name: (name, {}) for name in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                                             "decoder.conv_in", "decoder.conv_out")}
    levels = len(config.block_out_channels)
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        for index in range(2):
            modules[f"{part}.mid_block.resnets.{index}"] = (f"{part}.mid.block_{index + 1}", AUTOENCODER_RESNET_LEAVES)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", AUTOENCODER_ATTENTION_LEAVES)
    for level in range(levels):
        up = levels - 1 - level  # the original decoder counts its levels from the lowest resolution
        modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", {})
        modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{up}.upsample.conv", {})
        for layer in range(config.layers_per_block + 1):
            modules[f"encoder.down_blocks.{level}.resnets.{layer}"] = (f"encoder.down.{level}.block.{layer}",
                                                                       AUTOENCODER_RESNET_LEAVES)
            modules[f"decoder.up_blocks.{level}.resnets.{layer}"] = (f"decoder.up.{up}.block.{layer}",
                                                                     AUTOENCODER_RESNET_LEAVES)
    return modules


def renamed(state: dict[str, torch.Tensor], modules: dict[str, tuple[str, dict[str, str]]],
            prefix: str) -> dict[str, torch.Tensor]:
    """`state` under the original names; every key must fall in one of `modules`."""
    result = {}
    for key, tensor in state.items():
        module = max((name for name in modules if key.startswith(name + ".")), key=len, default=None)
        if module is None:
            raise KeyError(f"no original name for {key}")
        target, leaves = modules[module]
        rest = key[len(module) + 1:]
        leaf = max((name for name in leaves if rest.startswith(name + ".")), key=len, default=None)
        if leaf is not None:
            rest = leaves[leaf] + rest[len(leaf):]
        result[f"{prefix}{target}.{rest}"] = tensor
    return result


def original_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The single-file state dict of a Stable Diffusion v1 pipeline's three networks."""
    state = renamed(unet.state_dict(), unet_modules(unet.config), UNET_PREFIX)
    autoencoder = renamed(vae.state_dict(), autoencoder_modules(vae.config), AUTOENCODER_PREFIX)
    for key, tensor in autoencoder.items():
        attention = ".mid.attn_1." in key and tensor.dim() == 2
        state[key] = tensor[:, :, None, None] if attention else tensor  # the original attention is 1x1 convs
    for key, tensor in text_encoder.state_dict().items():
        # transformers >= 5.6 flattens CLIPTextModel (no `text_model.` level); the file always has it
        state[TEXT_ENCODER_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    return {key: tensor.detach().clone().contiguous() for key, tensor in state.items()}


def write_single_file(components: dict, path: Path) -> Path:
    """`components` (unet, vae, text_encoder) as one .safetensors file, or a .ckpt holding
    {"state_dict": ..., "global_step": ...} as the CompVis training code saved it."""
    state = original_state_dict(components["unet"], components["vae"], components["text_encoder"])
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def config_folder(pipeline_folder: Path, destination: Path) -> Path:
    """A copy of a pipeline folder with every weights file left out: the configs a single file needs."""
    for source in pipeline_folder.rglob("*"):
        if source.is_file() and source.suffix not in (".safetensors", ".bin"):
            target = destination / source.relative_to(pipeline_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return destination


def single_file_model(pipeline_folder: Path, destination: Path, suffix: str = ".safetensors") -> tuple[Path, Path]:
    """A Stable Diffusion pipeline folder split as users get a released model: one checkpoint file of the
    original format, and a folder of the configs without weights. Returns (file, config folder)."""
    from tfmq.models.loading import load_model

    model = load_model(pipeline_folder)
    destination.mkdir(parents=True, exist_ok=True)
    path = write_single_file({**model.components, "unet": model.unet}, destination / f"model{suffix}")
    return path, config_folder(pipeline_folder, destination / "configs")
