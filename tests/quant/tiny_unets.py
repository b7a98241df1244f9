"""Tiny random UNets for the quantization tests: a few ten thousand parameters, built in milliseconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel


def pixel_unet(seed: int = 0, channels: int = 3, size: int = 8) -> UNet2DModel:
    """Unconditional 8x8 UNet (RGB by default), self-attention in the lower block: a few thousand
    parameters, milliseconds per call."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def text_unet(seed: int = 0, cross_attention_dim: int = 8) -> UNet2DConditionModel:
    """Cross-attention 8x8 UNet on 4 latent channels, conditioning of width `cross_attention_dim`."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=cross_attention_dim, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def class_unet(seed: int = 0, num_classes: int = 3) -> UNet2DModel:
    """Class-conditional pixel UNet (LDM ImageNet style): `num_classes` labels and a last, null label for
    the unconditional branch of classifier-free guidance."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_classes + 1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_dit(seed: int = 0, num_classes: int = 3) -> DiTTransformer2DModel:
    """Class-conditional DiT on 8x8x4 latents, patch 2 (16 tokens of width 16), 2 adaLN-Zero blocks: every
    block has its own timestep + label embedder (a null label after the classes) and modulation Linear."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=num_classes,
    ).eval()


def tiny_pixart(seed: int = 0, caption_width: int = 8) -> PixArtTransformer2DModel:
    """Text-conditional PixArt-alpha transformer on 8x8x4 latents, 2 blocks, adaLN-single (one timestep
    embedder and one modulation Linear for all blocks), cross-attention to captions of width `caption_width`,
    learned variance (8 output channels)."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=caption_width, norm_num_groups=1,
    ).eval()


# Channels of the upsampled part of every up-block resnet's input, by diffusers' construction:
# resnet 0 reads the previous block's output (16 channels), later ones their own block's width.
# With block_out_channels (8, 16) both model types have the same layout.
EXPECTED_SPLITS = {
    "up_blocks.0.resnets.0.conv_shortcut": 16,
    "up_blocks.0.resnets.1.conv_shortcut": 16,
    "up_blocks.1.resnets.0.conv_shortcut": 16,
    "up_blocks.1.resnets.1.conv_shortcut": 8,
}


def unet_inputs(model: UNet2DModel | UNet2DConditionModel, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random keyword inputs for one forward: noise, timesteps and (for text UNets) 3 tokens."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
    }
    if isinstance(model, UNet2DConditionModel):
        inputs["encoder_hidden_states"] = torch.randn(batch, 3, config.cross_attention_dim, generator=generator)
    return inputs


@contextmanager
def one_thread() -> Iterator[None]:
    """Run on one torch thread, then put the thread count back: module fixtures built this way neither slow
    down nor change the numerics of the tests that run after them (a matmul's last bit follows the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
