"""Fashion-MNIST from a folder of idx files (Debian's `dataset-fashion-mnist` by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tfmq.data.idx import read_idx
from tfmq.errors import TfmqError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    hint = " (install it with: apt-get install dataset-fashion-mnist)" if folder == DEFAULT_FASHION_MNIST_DIR else ""
    raise TfmqError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}{hint}")


def to_model_range(images: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 images (N, H, W) -> float (N, 1, resolution, resolution) in [-1, 1].

    Downsizing uses antialiased bilinear filtering so that small models see clean garments, not aliasing.
    """
    tensor = torch.as_tensor(np.asarray(images)).float().div(127.5).sub(1.0).unsqueeze(1)
    if tensor.shape[-1] != resolution or tensor.shape[-2] != resolution:
        tensor = F.interpolate(tensor, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return tensor.clamp(-1.0, 1.0)


def load_fashion_mnist(
    split: str = "train", resolution: int = 28, folder: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] of shape (N, 1, resolution, resolution) and integer labels (N,)."""
    if split not in _PREFIX:
        raise TfmqError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = Path(folder) if folder is not None else DEFAULT_FASHION_MNIST_DIR
    images = read_idx(_find(folder, f"{_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{_PREFIX[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise TfmqError(f"Fashion-MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}")
    return to_model_range(images, resolution), torch.as_tensor(labels.astype(np.int64))
