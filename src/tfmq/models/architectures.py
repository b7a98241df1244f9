"""The architectures of the shipped models, sized for a 2-core CPU (see the model cards)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

FASHION_RESOLUTION = 16


def fashion_ddpm_unet(resolution: int = FASHION_RESOLUTION) -> UNet2DModel:
    """A 2.8 M-parameter pixel UNet with attention at 8x8 and 4x4 (the analogue of DDIM CIFAR-10).

    At 16x16 one forward at batch 64 costs about 0.1 s on 2 cores, so 1000 DDIM samples of 100 steps
    take a few minutes: the budget that keeps the whole method table near an hour.
    """
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def fashion_ddpm_scheduler() -> DDPMScheduler:
    """Linear betas, T = 1000, epsilon prediction: the DDPM set-up of the paper's CIFAR-10 model."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class FashionClassifier(nn.Module):
    """Small CNN on Fashion-MNIST whose features feed FID (pooled), sFID (spatial) and IS (logits).

    Inputs of any size are resized to `resolution`, so one network measures every shipped model.
    """

    num_features = 128
    num_spatial_features = 64 * 4 * 4

    def __init__(self, resolution: int = FASHION_RESOLUTION, num_classes: int = 10) -> None:
        super().__init__()
        self.resolution = resolution
        self.block1 = _conv_block(1, 32)
        self.block2 = _conv_block(32, 64)
        self.block3 = _conv_block(64, 128)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(128, num_classes)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return images

    def spatial_features(self, images: torch.Tensor) -> torch.Tensor:
        """Mid-level feature map (N, 64, R/4, R/4): where sFID looks for spatial structure."""
        hidden = F.max_pool2d(self.block1(self._resize(images)), 2)
        return F.max_pool2d(self.block2(hidden), 2)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128): the FID embedding."""
        return self.block3(self.spatial_features(images)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


LATENT_CHANNELS = 4
LATENT_RESOLUTION = FASHION_RESOLUTION // 2


def fashion_autoencoder(resolution: int = FASHION_RESOLUTION) -> AutoencoderKL:
    """A 0.66 M-parameter KL autoencoder, 16x16x1 -> 8x8x4: the fixed, full-precision first stage of the
    latent models (the analogue of LDM's VQ-f4 / KL-f8 autoencoders)."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=resolution,
    )


# The latent UNets' shared shape: 8x8x4 latents, channels (64, 128), attention heads of width 32.
_LATENT_UNET = {
    "sample_size": LATENT_RESOLUTION, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
    "layers_per_block": 1, "block_out_channels": (64, 128), "norm_num_groups": 16, "attention_head_dim": 32,
}


def fashion_ldm_unet() -> UNet2DModel:
    """A 2.8 M-parameter latent UNet (8x8x4), self-attention at 4x4 and in the middle: the LDM analogue."""
    return UNet2DModel(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        **_LATENT_UNET,
    )


def fashion_cond_unet(text_width: int = 64) -> UNet2DConditionModel:
    """A 3.9 M-parameter latent UNet with cross-attention to the prompt at 4x4 and in the middle: the
    Stable Diffusion analogue (same class, same call)."""
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width, **_LATENT_UNET,
    )


FASHION_CLASSES = 10


def fashion_dit_transformer() -> DiTTransformer2DModel:
    """A class-conditional diffusion transformer on the 8x8x4 latents (the DiT analogue): patch 2, so 16
    tokens of width 128, 6 blocks with adaLN-Zero modulation. The 10 garment classes plus a null label (the
    11th row of every block's label table, `num_embeds_ada_norm`) for classifier-free guidance. It predicts
    epsilon only (no learned variance), so `out_channels` equals `in_channels`.
    """
    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=6,
        sample_size=LATENT_RESOLUTION,
        patch_size=2,
        num_embeds_ada_norm=FASHION_CLASSES,
    )


def latent_scheduler() -> DDPMScheduler:
    """LDM's noise schedule ("scaled linear" betas 0.0015 .. 0.0195, T = 1000, epsilon), no clipping:
    latents are not bounded like pixels."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.0015,
        beta_end=0.0195,
        prediction_type="epsilon",
        clip_sample=False,
    )
