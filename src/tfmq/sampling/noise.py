"""Seeded noise that depends on (seed, image index) only, never on batch size or model.

A quantized model is compared image by image with the full-precision one, so image i of seed s must start
from (and, for stochastic samplers, draw) exactly the same noise whatever the batching.
"""

from __future__ import annotations

import numpy as np
import torch


def image_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, index) through numpy's SeedSequence."""
    generators = []
    for index in indices:
        state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
        generators.append(torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF))
    return generators


def draw(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """A batch of standard normal tensors, row i from generator i."""
    return torch.stack([torch.randn(shape, generator=generator, device=generator.device) for generator in generators])
