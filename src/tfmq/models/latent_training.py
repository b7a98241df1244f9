"""Training of the shipped latent models: the autoencoder, then `fashion-ldm` and `fashion-cond` on its
latents. Same resumable, step-seeded loop as `fashion-ddpm` (tfmq.models.training)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, LDMPipeline, PNDMScheduler, StableDiffusionPipeline
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from tfmq.data.fashion_mnist import load_fashion_mnist
from tfmq.models.architectures import (
    FASHION_RESOLUTION,
    fashion_autoencoder,
    fashion_cond_unet,
    fashion_dit_transformer,
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
# prompts dropped to "" (labels to the null label) in training: what classifier-free guidance needs
UNCONDITIONAL_PROBABILITY = 0.1


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


@dataclass(frozen=True)
class LatentTrainingData:
    """What every latent model trains on: the frozen autoencoder (its `scaling_factor` set from the data),
    the posterior means of the training images and of their mirror images, and the images' class labels."""

    autoencoder: AutoencoderKL
    latents: torch.Tensor
    flipped: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def prepare(cls, autoencoder_dir: str | Path, work_dir: Path, data_dir: str | Path | None) -> LatentTrainingData:
        """Encode the training set once (cached in `work_dir`) and scale the latents to unit variance: the
        scale goes into the autoencoder's `scaling_factor`, as diffusers pipelines expect."""
        work_dir.mkdir(parents=True, exist_ok=True)
        autoencoder = AutoencoderKL.from_pretrained(autoencoder_dir, local_files_only=True).requires_grad_(False)
        images, labels = load_fashion_mnist("train", FASHION_RESOLUTION, data_dir)
        latents, flipped = _encoded_training_set(autoencoder, images, work_dir / "latents.safetensors")
        autoencoder.register_to_config(scaling_factor=float(1.0 / latents.std()))
        return cls(autoencoder, latents, flipped, labels)

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder.config.scaling_factor)

    def batch(self, batch_size: int, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, scaled latents, generator) of training step `step`: a seeded epoch shuffle, mirrored
        half of the time, and the generator the step draws the rest of its randomness from."""
        index = batch_indices(len(self.latents), batch_size, step, seed)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        source = self.flipped if torch.rand(1, generator=generator).item() < 0.5 else self.latents
        return index, source[index] * self.scaling_factor, generator


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
    data = LatentTrainingData.prepare(autoencoder_dir, work_dir, data_dir)
    autoencoder, labels, scaling_factor = data.autoencoder, data.labels, data.scaling_factor
    scheduler = latent_scheduler()
    tokenizer = build_tokenizer()
    modules: dict[str, nn.Module] = {"unet": fashion_cond_unet() if conditional else fashion_ldm_unet()}
    if conditional:
        modules["text_encoder"] = build_text_encoder(len(tokenizer))

    def step_loss(step: int) -> torch.Tensor:
        index, clean, generator = data.batch(batch_size, step, seed)
        noisy, timesteps, noise = noised(clean, scheduler, generator)
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


def train_dit(
    out_dir: str | Path, work_dir: str | Path, autoencoder_dir: str | Path, *, steps: int = 8_000,
    batch_size: int = 64, learning_rate: float = 5e-4, seed: int = 0, data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Train `fashion-dit`, the class-conditional diffusion transformer, on the autoencoder's latents and
    write a diffusers DiTPipeline folder.

    One label in ten is replaced by the null label (the class count) with the step's seeded generator, for
    classifier-free guidance; the blocks' own random label drop is switched off, since each of diffusers'
    DiT blocks has its own label table and would drop a different set.
    """
    torch.manual_seed(seed)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    run = TrainingRun("fashion-dit", work_dir, steps, learning_rate)
    data = LatentTrainingData.prepare(autoencoder_dir, work_dir, data_dir)
    scheduler = latent_scheduler()
    transformer = fashion_dit_transformer()
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # the table keeps its null row; the drop happens below, seeded
    null_label = transformer.config.num_embeds_ada_norm

    def step_loss(step: int) -> torch.Tensor:
        index, clean, generator = data.batch(batch_size, step, seed)
        noisy, timesteps, noise = noised(clean, scheduler, generator)
        dropped = torch.rand(len(index), generator=generator) < UNCONDITIONAL_PROBABILITY
        labels = torch.where(dropped, null_label, data.labels[index])
        return F.mse_loss(transformer(noisy, timesteps, class_labels=labels).sample, noise)

    def export(emas: dict[str, nn.Module], step: int, seconds: float) -> None:
        # the switched-off label drop is no config: a loaded model has diffusers' rate again (unused in eval)
        pipeline = DiTPipeline(transformer=emas["transformer"], vae=data.autoencoder,
                               scheduler=DDIMScheduler.from_config(dict(scheduler.config)))
        with trained_model_folder(out_dir, overwrite) as staging:
            pipeline.save_pretrained(staging)
            write_training_record(staging, run, step, seconds, batch_size=batch_size, seed=seed,
                                  scaling_factor=data.scaling_factor, autoencoder=str(autoencoder_dir),
                                  unconditional_probability=UNCONDITIONAL_PROBABILITY)

    run_training(run, {"transformer": transformer}, step_loss, export)
    return out_dir
