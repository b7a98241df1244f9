"""Tiny random pipeline folders of every layout tfmq loads, written in milliseconds for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DiTPipeline, LDMPipeline, PNDMScheduler,
                       StableDiffusionPipeline)
from diffusers import UNet2DModel
from tests.quant.tiny_unets import class_unet, pixel_unet, text_unet, tiny_dit
from transformers import CLIPTextConfig, CLIPTextModel

from tfmq.models.architectures import fashion_ddpm_scheduler, latent_scheduler
from tfmq.models.prompts import build_tokenizer

FAMILIES = ("pixel", "latent", "class", "text", "dit")


def tiny_autoencoder(seed: int = 0) -> AutoencoderKL:
    """16x16x1 images <-> 8x8x4 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=16,
    ).eval()


def latent_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    """Width 8, the cross-attention width of `text_unet`."""
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)).eval()


def write_pipeline(family: str, folder: Path) -> Path:
    """A pipeline folder of `family`: DDPMPipeline (pixel, class-conditional), LDMPipeline, StableDiffusion,
    DiTPipeline (a class-conditional latent transformer)."""
    if family == "pixel":
        pipeline = DDPMPipeline(unet=pixel_unet(channels=1), scheduler=fashion_ddpm_scheduler())
    elif family == "class":
        pipeline = DDPMPipeline(unet=class_unet(), scheduler=fashion_ddpm_scheduler())
    elif family == "latent":
        pipeline = LDMPipeline(vqvae=tiny_autoencoder(), unet=latent_unet(),
                               scheduler=DDIMScheduler.from_config(latent_scheduler().config))
    elif family == "dit":
        pipeline = DiTPipeline(transformer=tiny_dit(), vae=tiny_autoencoder(),
                               scheduler=DDIMScheduler.from_config(latent_scheduler().config))
    else:
        tokenizer = build_tokenizer()
        pipeline = StableDiffusionPipeline(
            vae=tiny_autoencoder(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
            unet=text_unet(),
            scheduler=PNDMScheduler.from_config(latent_scheduler().config, skip_prk_steps=True, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder
