"""Training of the shipped models: resumable, seeded, with the wall time recorded for the model card."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from tfmq.data.fashion_mnist import load_fashion_mnist
from tfmq.files import atomic_directory
from tfmq.models.architectures import (
    FASHION_RESOLUTION,
    FashionClassifier,
    fashion_ddpm_scheduler,
    fashion_ddpm_unet,
)


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of batch `step` in a per-epoch shuffle that depends only on (seed, epoch): resumable."""
    per_epoch = num_items // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def _log(log_path: Path, record: dict) -> None:
    with open(log_path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class TrainingRun:
    """The schedule of one resumable training run: AdamW with warm-up and cosine decay, EMA weights."""

    name: str
    work_dir: Path
    steps: int
    learning_rate: float
    ema_decay: float = 0.9995
    warmup: int = 500
    checkpoint_every: int = 500
    export_every: int = 2_000


def run_training(
    run: TrainingRun,
    modules: dict[str, nn.Module],
    step_loss: Callable[[int], torch.Tensor],
    export: Callable[[dict[str, nn.Module], int, float], None],
) -> None:
    """Train `modules` on `step_loss(step)` (which must draw its data and noise from the step number, so a
    resumed run draws what an uninterrupted one would), checkpointing to `run.work_dir` (read back with
    weights_only=True) and handing the EMA copies to `export` every `export_every` steps and at the end."""
    run.work_dir.mkdir(parents=True, exist_ok=True)
    emas = {name: deepcopy(module).requires_grad_(False) for name, module in modules.items()}
    parameters = [parameter for module in modules.values() for parameter in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=run.learning_rate, weight_decay=0.0)
    checkpoint_path = run.work_dir / "checkpoint.pt"
    start, elapsed = 0, 0.0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)
        for name in modules:
            modules[name].load_state_dict(state["model"][name])
            emas[name].load_state_dict(state["ema"][name])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
    for module in modules.values():
        module.train()
    began = time.perf_counter() - elapsed
    progress = tqdm(range(start, run.steps), initial=start, total=run.steps, desc=f"train {run.name}")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, run.steps, run.learning_rate, run.warmup)
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(run.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in modules.items():
                for ema_param, param in zip(emas[name].parameters(), module.parameters()):
                    ema_param.lerp_(param, 1 - decay)
        done = step + 1
        if done % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
            _log(run.work_dir / "loss.jsonl", {"step": done, "loss": loss.item(), "seconds": time.perf_counter() - began})
        if done % run.checkpoint_every == 0 or done == run.steps:
            elapsed = time.perf_counter() - began
            tmp = checkpoint_path.with_suffix(".tmp")
            torch.save({"model": {name: module.state_dict() for name, module in modules.items()},
                        "ema": {name: ema.state_dict() for name, ema in emas.items()},
                        "optimizer": optimizer.state_dict(), "step": done, "elapsed": elapsed}, tmp)
            tmp.replace(checkpoint_path)
        if done % run.export_every == 0 or done == run.steps:
            export(emas, done, time.perf_counter() - began)


TRAINED_MODEL_KIND = "trained-model"


def trained_model_folder(out_dir: str | Path, overwrite: bool = False) -> AbstractContextManager[Path]:
    """Where an export of a training run is staged: each export replaces the previous one whole (see
    `tfmq.files`); the first replaces another folder only with `overwrite`."""
    return atomic_directory(out_dir, kind=TRAINED_MODEL_KIND, overwrite=overwrite)


def write_training_record(out_dir: Path, run: TrainingRun, step: int, seconds: float, **settings: Any) -> None:
    (out_dir / "training.json").write_text(json.dumps({
        "steps": step, "learning_rate": run.learning_rate, "ema_decay": run.ema_decay, **settings,
        "wall_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
    }, indent=2))


def noised(clean: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x_t, t, noise) for a batch of clean samples: uniform training timesteps, the forward process."""
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
    abar = scheduler.alphas_cumprod[timesteps].view(-1, *([1] * (clean.dim() - 1)))
    return abar.sqrt() * clean + (1 - abar).sqrt() * noise, timesteps, noise


def flipped_batch(images: torch.Tensor, batch_size: int, step: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """Batch `step` of a seeded epoch shuffle, flipped horizontally half of the time (garments stay
    garments), and the generator the step draws the rest of its randomness from."""
    index = batch_indices(len(images), batch_size, step, seed)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    clean = images[index]
    if torch.rand(1, generator=generator).item() < 0.5:
        clean = clean.flip(-1)
    return clean, generator


def train_ddpm(
    out_dir: str | Path,
    work_dir: str | Path,
    steps: int = 20_000,
    batch_size: int = 64,
    learning_rate: float = 5e-4,
    ema_decay: float = 0.9995,
    seed: int = 0,
    resolution: int = FASHION_RESOLUTION,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Train `fashion-ddpm` and write its EMA weights as a diffusers DDPMPipeline folder at `out_dir`.

    `work_dir` holds the resume checkpoint and a JSONL loss log; running the same command again continues
    where it stopped.
    """
    from diffusers import DDPMPipeline

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    run = TrainingRun("fashion-ddpm", Path(work_dir), steps, learning_rate, ema_decay)
    images, _ = load_fashion_mnist("train", resolution, data_dir)
    model, scheduler = fashion_ddpm_unet(resolution), fashion_ddpm_scheduler()

    def step_loss(step: int) -> torch.Tensor:
        clean, generator = flipped_batch(images, batch_size, step, seed)
        noisy, timesteps, noise = noised(clean, scheduler, generator)
        return F.mse_loss(model(noisy, timesteps).sample, noise)

    def export(emas: dict[str, nn.Module], step: int, seconds: float) -> None:
        with trained_model_folder(out_dir, overwrite) as staging:
            DDPMPipeline(unet=emas["unet"], scheduler=scheduler).save_pretrained(staging)
            write_training_record(staging, run, step, seconds, batch_size=batch_size, seed=seed,
                                  resolution=resolution)

    run_training(run, {"unet": model}, step_loss, export)
    return out_dir


def train_classifier(
    out_dir: str | Path,
    epochs: int = 15,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    resolution: int = FASHION_RESOLUTION,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the metrics feature network; returns (and writes) its test accuracy and wall time."""
    torch.manual_seed(seed)
    began = time.perf_counter()
    images, labels = load_fashion_mnist("train", resolution, data_dir)
    test_images, test_labels = load_fashion_mnist("test", resolution, data_dir)
    model = FashionClassifier(resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    per_epoch = len(images) // batch_size
    total = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=total)
    generator = torch.Generator().manual_seed(seed)
    for step in tqdm(range(total), desc="train classifier"):
        model.train()
        index = batch_indices(len(images), batch_size, step, seed)
        batch = images[index]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        batch = torch.roll(batch, shifts=shift, dims=(-2, -1))
        loss = F.cross_entropy(model(batch), labels[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in test_images.split(1000)])
    accuracy = (predictions == test_labels).float().mean().item()
    record = {
        "architecture": "FashionClassifier", "resolution": resolution, "num_classes": 10,
        "test_accuracy": round(accuracy, 4), "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "seed": seed, "wall_seconds": round(time.perf_counter() - began, 1),
        "torch_threads": torch.get_num_threads(),
    }
    with trained_model_folder(out_dir, overwrite) as staging:
        save_file(model.state_dict(), str(staging / "model.safetensors"))
        (staging / "config.json").write_text(json.dumps(record, indent=2))
    return record
