"""Training of the shipped latent models: the autoencoder, then `fashion-ldm` and `fashion-cond` on its
latents. Same resumable, step-seeded loop as `fashion-ddpm` (tfmq.models.training)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, PNDMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from tfmq.data.fashion_mnist import load_fashion_mnist
from tfmq.models.architectures import (
    FASHION_RESOLUTION,
    fashion_autoencoder,
    fashion_cond_unet,
    fashion_ldm_unet,
    latent_scheduler,
)
from tfmq.models.loading import CALIBRATION_PROMPTS_FILE
from tfmq.models.prompts import build_text_encoder, build_tokenizer, calibration_prompts, prompt_for, tokenize
from tfmq.models.training import (
    TrainingRun,
    batch_indices,
    flipped_batch,
    noised,
    run_training,
    trained_model_folder,
    write_training_record,
)

# LDM's first stages are trained with a KL weight of 1e-6: a near-deterministic autoencoder whose latents
# are rescaled to unit variance before diffusion.
KL_WEIGHT = 1e-6
UNCONDITIONAL_PROBABILITY = 0.1  # prompts dropped to "" in training: what classifier-free guidance needs


def train_autoencoder(
    out_dir: str | Path, work_dir: str | Path, steps: int = 3_000, batch_size: int = 64,
    learning_rate: float = 1e-3, seed: int = 0, data_dir: str | Path | None = None, overwrite: bool = False,
) -> Path:
    """Train the 16x16x1 -> 8x8x4 KL autoencoder (reconstruction MSE + KL_WEIGHT x KL) into `out_dir`."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    run = TrainingRun("autoencoder", Path(work_dir), steps, learning_rate, warmup=200)
    images, _ = load_fashion_mnist("train", FASHION_RESOLUTION, data_dir)
    autoencoder = fashion_autoencoder()

    def step_loss(step: int) -> torch.Tensor:
        clean, generator = flipped_batch(images, batch_size, step, seed)
        posterior = autoencoder.encode(clean).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = autoencoder.decode(latents).sample
        return F.mse_loss(reconstruction, clean) + KL_WEIGHT * posterior.kl().mean()

    def export(emas: dict[str, nn.Module], step: int, seconds: float) -> None:
        with trained_model_folder(out_dir, overwrite) as staging:
            emas["autoencoder"].save_pretrained(staging)
            write_training_record(staging, run, step, seconds, batch_size=batch_size, seed=seed, kl_weight=KL_WEIGHT)

    run_training(run, {"autoencoder": autoencoder}, step_loss, export)
    return out_dir


@torch.no_grad()
def _encoded_training_set(
    autoencoder: AutoencoderKL, images: torch.Tensor, cache: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means of the training images and of their mirror images (cached in `cache`)."""
    if cache.exists():
        tensors = load_file(str(cache))
        return tensors["latents"], tensors["flipped"]
    autoencoder.eval()
    encoded = {}
    for key, source in (("latents", images), ("flipped", images.flip(-1))):
        chunks = [autoencoder.encode(chunk).latent_dist.mean for chunk in tqdm(source.split(500), desc=f"encode {key}")]
        encoded[key] = torch.cat(chunks).contiguous()
    save_file(encoded, str(cache))
    return encoded["latents"], encoded["flipped"]


def train_latent_diffusion(
    out_dir: str | Path, work_dir: str | Path, autoencoder_dir: str | Path, *, conditional: bool,
    steps: int = 6_000, batch_size: int = 64, learning_rate: float = 5e-4, seed: int = 0,
    data_dir: str | Path | None = None, overwrite: bool = False,
) -> Path:
    """Train `fashion-ldm` (unconditional, an LDMPipeline folder) or `fashion-cond` (prompted, with its text
    encoder trained alongside; a StableDiffusionPipeline folder) on the autoencoder's latents.

    The latents are scaled to unit variance (the scale goes into the autoencoder's `scaling_factor`, as
    diffusers pipelines expect); a conditional run replaces the prompt by "" one time in ten.
    """
    torch.manual_seed(seed)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    name = "fashion-cond" if conditional else "fashion-ldm"
    run = TrainingRun(name, work_dir, steps, learning_rate)
    work_dir.mkdir(parents=True, exist_ok=True)
    autoencoder = AutoencoderKL.from_pretrained(autoencoder_dir, local_files_only=True).requires_grad_(False)
    images, labels = load_fashion_mnist("train", FASHION_RESOLUTION, data_dir)
    latents, flipped = _encoded_training_set(autoencoder, images, work_dir / "latents.safetensors")
    scaling_factor = float(1.0 / latents.std())
    autoencoder.register_to_config(scaling_factor=scaling_factor)
    scheduler = latent_scheduler()
    tokenizer = build_tokenizer()
    modules: dict[str, nn.Module] = {"unet": fashion_cond_unet() if conditional else fashion_ldm_unet()}
    if conditional:
        modules["text_encoder"] = build_text_encoder(len(tokenizer))

    def step_loss(step: int) -> torch.Tensor:
        index = batch_indices(len(latents), batch_size, step, seed)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        source = flipped if torch.rand(1, generator=generator).item() < 0.5 else latents
        noisy, timesteps, noise = noised(source[index] * scaling_factor, scheduler, generator)
        if not conditional:
            return F.mse_loss(modules["unet"](noisy, timesteps).sample, noise)
        keep = torch.rand(len(index), generator=generator) >= UNCONDITIONAL_PROBABILITY
        prompts = [prompt_for(int(label), generator) if kept else "" for label, kept in zip(labels[index], keep)]
        states = modules["text_encoder"](tokenize(tokenizer, prompts)).last_hidden_state
        return F.mse_loss(modules["unet"](noisy, timesteps, encoder_hidden_states=states).sample, noise)

    def export(emas: dict[str, nn.Module], step: int, seconds: float) -> None:
        sampler_config = dict(scheduler.config)
        if conditional:
            pipeline = StableDiffusionPipeline(
                vae=autoencoder, text_encoder=emas["text_encoder"], tokenizer=tokenizer, unet=emas["unet"],
                scheduler=PNDMScheduler.from_config(sampler_config, skip_prk_steps=True, steps_offset=1), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        else:
            pipeline = LDMPipeline(vqvae=autoencoder, unet=emas["unet"], scheduler=DDIMScheduler.from_config(sampler_config))
        with trained_model_folder(out_dir, overwrite) as staging:
            pipeline.save_pretrained(staging)
            if conditional:
                (staging / CALIBRATION_PROMPTS_FILE).write_text("\n".join(calibration_prompts()) + "\n")
            write_training_record(staging, run, step, seconds, batch_size=batch_size, seed=seed,
                                  scaling_factor=scaling_factor, autoencoder=str(autoencoder_dir),
                                  unconditional_probability=UNCONDITIONAL_PROBABILITY if conditional else None)

    run_training(run, modules, step_loss, export)
    return out_dir
