"""Image-quality metrics: against the data (FID, sFID, IS) and against paired full-precision samples.

FID and IS are torchmetrics' implementations fed with our own feature network; the reference statistics of
the Fashion-MNIST test set are torchmetrics' own running sums, stored so the test set need not ship.
Never compare these values with papers' Inception-based figures: only with each other.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from tfmq.errors import TfmqError
from tfmq.files import WRITTEN_BY
from tfmq.images import from_uint8, to_uint8
from tfmq.metrics.feature_network import Embedding, load_classifier
from tfmq.models.architectures import FASHION_RESOLUTION

REFERENCE_FILE = Path(__file__).resolve().parent / "fashion_mnist_test_stats.safetensors"
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; the mean needs a finite stand-in
SSIM_KERNEL = 7  # the usual 11-pixel window leaves only 6x6 valid pixels of a 16x16 image
_CHUNK = 500
_FID_STATES = ("features_sum", "features_cov_sum", "features_num_samples")
_STATISTICS = tuple(f"{name}.{state}" for name in ("fid", "sfid") for state in _FID_STATES)
_NETWORK_INPUT = "the metrics network reads"


@dataclass(frozen=True)
class ReferenceStatistics:
    """The real-image sums of FID and sFID, with the resolution of the images they were made from: images of
    another size would still get a score (the network resizes its input), only a meaningless one."""

    tensors: dict[str, torch.Tensor]
    resolution: int


def _frechet(embedding: Embedding, device: torch.device) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(feature=embedding, reset_real_features=False).to(device)


def _update(metric: FrechetInceptionDistance | InceptionScore, images: torch.Tensor, **real: bool) -> None:
    for chunk in images.split(_CHUNK):
        metric.update(chunk.to(metric.device), **real)


def png_like(images: torch.Tensor) -> torch.Tensor:
    """Round images to 8 bits, as the saved PNGs are, so reference and samples go through the same path."""
    return from_uint8(to_uint8(images))


class QualityMetrics:
    """Holds the feature network once, on `device` (the CPU by default), and computes every metric with it;
    images and statistics come and go on the CPU."""

    def __init__(self, classifier_dir: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        classifier = (load_classifier(classifier_dir) if classifier_dir else load_classifier()).to(self.device)
        self.pooled = Embedding(classifier, "pooled")
        self.spatial = Embedding(classifier, "spatial")
        self.logits = Embedding(classifier, "logits")
        self.resolution = classifier.resolution

    def check_images(self, images: torch.Tensor, reference: ReferenceStatistics | None = None) -> None:
        """Refuse images the scores would mean nothing for: not gray, or (against `reference`) of another size
        than the reference images and the network's input."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise TfmqError(f"images of shape {tuple(images.shape[1:])}: the metrics read gray images (1, H, W)")
        if reference is not None:
            _check_size(images, reference.resolution, "the reference statistics were made from")
            _check_size(images, self.resolution, _NETWORK_INPUT)

    def reference_statistics(self, images: torch.Tensor) -> ReferenceStatistics:
        """The real-image sums of FID and sFID for `images` (e.g. the test set), ready to save."""
        self.check_images(images)
        _check_size(images, self.resolution, _NETWORK_INPUT)
        statistics = {}
        for name, embedding in (("fid", self.pooled), ("sfid", self.spatial)):
            metric = _frechet(embedding, self.device)
            _update(metric, png_like(images), real=True)
            for state in _FID_STATES:
                statistics[f"{name}.{state}"] = getattr(metric, f"real_{state}").to("cpu", copy=True)
        return ReferenceStatistics(statistics, self.resolution)

    def _against_statistics(self, embedding: Embedding, name: str, statistics: ReferenceStatistics,
                            images: torch.Tensor) -> float:
        metric = _frechet(embedding, self.device)
        for state in _FID_STATES:
            setattr(metric, f"real_{state}", statistics.tensors[f"{name}.{state}"].to(self.device, copy=True))
        _update(metric, images, real=False)
        return float(metric.compute())

    def against_reference(self, images: torch.Tensor, statistics: ReferenceStatistics) -> dict[str, float]:
        """FID, sFID and IS of generated images against the reference statistics."""
        self.check_images(images, statistics)
        _need_two(images)
        with warnings.catch_warnings():  # it warns that it keeps all features: a few MB for our 10 logits
            warnings.simplefilter("ignore", UserWarning)
            inception = InceptionScore(feature=self.logits, splits=10).to(self.device)
        _update(inception, images)
        with torch.random.fork_rng():  # IS shuffles its splits with the global generator
            torch.manual_seed(0)
            is_mean, is_std = inception.compute()
        return {
            "fid": self._against_statistics(self.pooled, "fid", statistics, images),
            "sfid": self._against_statistics(self.spatial, "sfid", statistics, images),
            "is": float(is_mean),
            "is_std": float(is_std),
        }

    @torch.no_grad()
    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The fraction of images the classifier assigns the class they were asked for: tfmq's analogue
        of CLIP score (does a conditional model still draw what the prompt or label names?)."""
        if len(images) != len(labels):
            raise TfmqError(f"{len(images)} images but {len(labels)} requested classes")
        self.check_images(images)
        predicted = torch.cat([self.logits(chunk.to(self.device)).argmax(1) for chunk in images.split(_CHUNK)])
        return float((predicted == labels.to(predicted.device)).float().mean())

    def between(self, images: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
        """FID between two sets, and per-image PSNR/SSIM of images paired by index (same seeds)."""
        if images.shape != baseline.shape:
            raise TfmqError(f"paired sets differ in shape: {tuple(images.shape)} vs {tuple(baseline.shape)}")
        self.check_images(images)
        _need_two(images)
        metric = _frechet(self.pooled, self.device)
        _update(metric, baseline, real=True)
        _update(metric, images, real=False)
        return {"fid_to_baseline": float(metric.compute()), **paired_similarity(images, baseline)}


def paired_similarity(images: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB, capped at PSNR_CAP_DB per image) and mean SSIM of images in [-1, 1]."""
    mse = (images - baseline).pow(2).flatten(1).mean(1)
    psnr = torch.where(mse > 0, 10 * torch.log10(4.0 / mse.clamp(min=1e-30)), torch.tensor(PSNR_CAP_DB))
    ssim = structural_similarity_index_measure(
        images, baseline, data_range=2.0, kernel_size=SSIM_KERNEL, reduction="none"
    )
    return {"psnr": float(psnr.clamp(max=PSNR_CAP_DB).mean()), "ssim": float(ssim.mean())}


def _need_two(images: torch.Tensor) -> None:
    if len(images) < 2:
        raise TfmqError(f"FID needs at least 2 images, got {len(images)}")


def _check_size(images: torch.Tensor, resolution: int, what: str) -> None:
    height, width = images.shape[-2:]
    if (height, width) != (resolution, resolution):
        raise TfmqError(f"images are {height}x{width}, but {what} {resolution}x{resolution} images")


def save_reference_statistics(statistics: ReferenceStatistics, path: str | Path = REFERENCE_FILE) -> None:
    tensors = {key: value.contiguous() for key, value in statistics.tensors.items()}
    save_file(tensors, str(path), metadata={"resolution": str(statistics.resolution), "written_by": WRITTEN_BY})


def load_reference_statistics(path: str | Path = REFERENCE_FILE) -> ReferenceStatistics:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise TfmqError(f"cannot read reference statistics {path}: {str(exc).splitlines()[0]}") from exc
    missing = [key for key in _STATISTICS if key not in tensors]
    if missing:
        raise TfmqError(f"reference statistics {path} lack {', '.join(missing)}: not written by tfmq reference-stats")
    resolution = metadata.get("resolution", "")
    if not resolution.isdigit() or int(resolution) == 0:
        raise TfmqError(f"reference statistics {path} record no image resolution (metadata 'resolution')")
    return ReferenceStatistics(tensors, int(resolution))
