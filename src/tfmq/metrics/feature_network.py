"""The shipped Fashion-MNIST classifier as the embedding behind FID (pooled), sFID (spatial) and IS (logits)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tfmq.errors import TfmqError
from tfmq.models.architectures import FashionClassifier
from tfmq.models.loading import ZOO_DIR

CLASSIFIER_DIR = ZOO_DIR / "fashion-classifier"
# sFID keeps the first channels of the mid-level map, as the original sFID keeps 7 Inception channels:
# 16 channels x 4 x 4 = 256 dimensions, a covariance that 1000 samples estimate well.
SPATIAL_CHANNELS = 16


def load_classifier(folder: str | Path = CLASSIFIER_DIR) -> FashionClassifier:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # missing file, bad JSON, corrupt safetensors: all the user's to fix
        raise TfmqError(f"cannot load the feature network from {folder}: {str(exc).splitlines()[0]}") from exc
    classifier = FashionClassifier(config["resolution"], config["num_classes"])
    classifier.load_state_dict(state)
    return classifier.eval().requires_grad_(False)


class Embedding(nn.Module):
    """One view of the classifier, with the `num_features` attribute torchmetrics asks of custom extractors."""

    KINDS = ("pooled", "spatial", "logits")

    def __init__(self, classifier: FashionClassifier, kind: str) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown embedding kind {kind!r}")
        self.classifier, self.kind = classifier, kind
        resolution = classifier.resolution // 4
        self.num_features = {
            "pooled": classifier.num_features,
            "spatial": SPATIAL_CHANNELS * resolution * resolution,
            "logits": classifier.head.out_features,
        }[kind]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "pooled":
            return self.classifier.features(images)
        if self.kind == "spatial":
            return self.classifier.spatial_features(images)[:, :SPATIAL_CHANNELS].flatten(1)
        return self.classifier(images)
