"""Scoring sample folders (what `tfmq sample` writes): FID/sFID/IS against reference statistics, FID/PSNR/SSIM
against a baseline folder of the same seeds, and the class accuracy of conditional samples. The pairing rules
live here: two folders are compared image by image only when they hold the same names from the same seed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tfmq.errors import TfmqError
from tfmq.images import load_image_folder
from tfmq.metrics.quality import QualityMetrics, ReferenceStatistics
from tfmq.models.prompts import prompt_class

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
