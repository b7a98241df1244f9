"""Sample folders (what `tfmq sample` writes and `tfmq eval` scores): sampled batch by batch so that an
interrupted run continues, and scored: FID/sFID/IS against reference statistics, FID/PSNR/SSIM against a
baseline folder of the same seeds, and the class accuracy of conditional samples. The pairing rules live here:
two folders are compared image by image only when they hold the same names from the same seed."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn
from tqdm import tqdm

from tfmq import distributed
from tfmq.devices import module_device
from tfmq.errors import TfmqError
from tfmq.images import ImageBatches, load_image_folder, progress_folder, save_image_folder
from tfmq.metrics.quality import QualityMetrics, ReferenceStatistics
from tfmq.models.prompts import prompt_class
from tfmq.quant.provenance import model_fingerprint
from tfmq.sampling import Conditioning, SamplerConfig, check_sample, sample_batch
from tfmq.sampling.sampler import Decoder

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.json"


@dataclass(frozen=True)
class SampleFolder:
    """A folder of generated images, with what its samples.json says: the seed and each image's requested class."""

    path: Path
    names: list[str]
    images: torch.Tensor
    seed: int | None
    requested_classes: torch.Tensor | None

    @classmethod
    def load(cls, folder: str | Path) -> SampleFolder:
        path = Path(folder)
        names, images = load_image_folder(path, skip=(METRICS_FILE,))
        metadata = _samples_metadata(path)
        return cls(path, names, images, metadata.get("seed"), _requested_classes(metadata, len(images)))


@dataclass(frozen=True)
class SampledFolder:
    """What `sample_folder` wrote: `kept` of the images came from an interrupted run of the same identity,
    the others were sampled in `seconds`."""

    path: Path
    num_images: int
    kept: int
    seconds: float


def model_identity(*parts: nn.Module | Path | None) -> str:
    """One digest of what a folder's images depend on besides the sampler, the seeds and the conditions:
    each module's fingerprint (the UNet, a latent model's autoencoder) or each file's content (an exported
    graph run by an engine)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            digest.update(model_fingerprint(part).encode())
        elif part is not None:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _conditioning_digest(conditioning: Conditioning | None) -> str | None:
    if conditioning is None:
        return None
    digest = hashlib.sha256(repr(conditioning.guidance_scale).encode())
    for prefix, inputs in (("image", conditioning.per_image), ("unconditional", conditioning.unconditional or {})):
        for key, tensor in sorted(inputs.items()):
            digest.update(f"{prefix}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sample_folder(
    unet: nn.Module, scheduler: DDPMScheduler, out: str | Path, num_images: int, seed: int = 0,
    config: SamplerConfig = SamplerConfig(), batch_size: int = 64, *, model_digest: str,
    metadata: dict[str, Any] | None = None, conditioning: Conditioning | None = None, decoder: Decoder | None = None,
    progress: bool = True, overwrite: bool = False, protected: Iterable[str | Path] = (),
) -> SampledFolder | None:
    """Sample the images `tfmq.sampling.sample` would into the image folder `out` (`save_image_folder`, with
    `metadata` and this run's sampling "seconds"), keeping each finished batch beside it (`ImageBatches`).

    A run killed halfway and started again with the same arguments samples only the batches it had not
    finished, in the same batches, and writes the folder an uninterrupted run writes. `model_digest` is the
    `model_identity` of what `unet` and `decoder` compute with. Under a process group every rank calls it;
    each samples whole batches, rank 0 keeps them and writes, and only rank 0 gets the result (others None).
    """
    check_sample(unet, scheduler, num_images, seed, config, batch_size)
    if conditioning is not None and conditioning.per_image and len(conditioning) != num_images:
        raise TfmqError(f"{len(conditioning)} conditions for {num_images} images: give one per image")
    identity = {"model": model_digest, "sampler": config.to_dict(), "seed": seed, "num_images": num_images,
                "batch_size": batch_size, "conditioning": _conditioning_digest(conditioning),
                "device": module_device(unet).type}
    distributed.check_same_on_all_ranks(identity, "the images to sample (model, sampler, seeds, conditions)")
    kept = ImageBatches(progress_folder(out), identity) if distributed.is_main() else None
    finished = distributed.on_main(lambda: kept.finished())
    batches = [range(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]
    missing = [indices for indices in batches if indices not in finished]
    world, rank = distributed.world_size(), distributed.rank()
    started = time.perf_counter()
    with tqdm(total=len(batches), initial=len(batches) - len(missing), desc=f"{config.name} {config.steps} steps",
              unit="batch", disable=not progress) as bar:
        for first in range(0, len(missing), world):  # a round: one batch a rank
            round_batches = missing[first:first + world]
            mine = {}
            if rank < len(round_batches):
                indices = round_batches[rank]
                mine["images"] = sample_batch(unet, scheduler, config, seed, indices, conditioning=None if
                                              conditioning is None else conditioning.of_images(indices),
                                              decoder=decoder)
            images = distributed.gather_rows(mine)["images"]
            if kept is not None:
                for indices, batch in zip(round_batches, images.split([len(each) for each in round_batches])):
                    kept.save(indices, batch)
            bar.update(len(round_batches))
    seconds = time.perf_counter() - started
    if kept is None:
        return None
    save_image_folder(kept.load(batches), out, {**(metadata or {}), "seconds": round(seconds, 2)},
                      overwrite=overwrite, protected=protected)
    kept.remove()
    return SampledFolder(Path(out), num_images, num_images - sum(len(indices) for indices in missing), seconds)


def evaluate_folder(
    samples: SampleFolder, baseline: SampleFolder | None = None, reference: ReferenceStatistics | None = None,
    metrics: QualityMetrics | None = None,
) -> dict[str, Any]:
    """The scores of `samples`: against `reference` statistics, against `baseline` (paired by seed), and the
    class accuracy when the folder records requested classes."""
    metrics = metrics or QualityMetrics()
    result: dict[str, Any] = {"images": str(samples.path), "num_images": len(samples.images)}
    if reference is not None:
        result.update(metrics.against_reference(samples.images, reference))
    if baseline is not None:
        check_paired(samples, baseline)
        result["baseline"] = str(baseline.path)
        result.update(metrics.between(samples.images, baseline.images))
    if samples.requested_classes is not None:
        result["class_accuracy"] = metrics.class_accuracy(samples.images, samples.requested_classes)
    return result


def check_paired(samples: SampleFolder, baseline: SampleFolder) -> None:
    """Refuse pairs that are not the same seeds: other image names, or samples.json seeds that differ."""
    if samples.names != baseline.names:
        raise TfmqError(f"{samples.path} and {baseline.path} do not hold the same image names; pair sets of one seed")
    if None not in (samples.seed, baseline.seed) and samples.seed != baseline.seed:
        raise TfmqError(f"the two sets come from different seeds ({samples.seed} vs {baseline.seed}): no pairing")


def _samples_metadata(folder: Path) -> dict[str, Any]:
    metadata_file = folder / SAMPLES_FILE
    if not metadata_file.is_file():
        return {}
    try:
        metadata = json.loads(metadata_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _requested_classes(metadata: dict[str, Any], count: int) -> torch.Tensor | None:
    """The class each image was asked for (its label, or the garment its prompt names), or None when the folder
    records none or a prompt names no single garment."""
    labels = metadata.get("class_labels")
    if labels is None and metadata.get("prompts"):
        labels = [prompt_class(prompt) for prompt in metadata["prompts"]]
    if not isinstance(labels, list) or len(labels) != count or None in labels:
        return None
    return torch.as_tensor(labels)
