"""Conditioning and classifier-free guidance: what a conditional UNet is called with at each step.

A conditional model (class labels, or text through `encoder_hidden_states`) gets one condition per image;
with a guidance scale s != 1 every step runs the UNet on the unconditional and the conditional branch in
one doubled batch and mixes eps = eps_u + s (eps_c - eps_u), as LDM and Stable Diffusion do. A scale of 1
runs the conditional branch alone. Calibration records the doubled batch, so it holds both branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfmq.errors import TfmqError
from tfmq.sampling.validation import check_number


@dataclass(frozen=True)
class Conditioning:
    """Per-image UNet keyword inputs (`per_image`, each (N, ...)), the unconditional inputs (each (1, ...);
    None when the model has no unconditional branch) and the guidance scale."""

    per_image: dict[str, torch.Tensor]
    unconditional: dict[str, torch.Tensor] | None = None
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        check_number("guidance scale", self.guidance_scale, minimum=0)
        if self.guided and self.unconditional is None:
            raise TfmqError(f"guidance scale {self.guidance_scale} needs an unconditional branch, which this "
                            "model has not")
        sizes = {len(value) for value in self.per_image.values()}
        if len(sizes) > 1:
            raise TfmqError(f"conditions of different lengths: {sorted(sizes)}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def __len__(self) -> int:
        return len(next(iter(self.per_image.values()))) if self.per_image else 0

    def of_images(self, indices: range | list[int]) -> Conditioning:
        """The conditioning of images `indices` (a batch)."""
        positions = torch.as_tensor(list(indices), device="cpu")
        return Conditioning({key: value[positions] for key, value in self.per_image.items()}, self.unconditional,
                            self.guidance_scale)

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        """The same conditioning where the UNet runs: floating inputs in its dtype, labels as they are."""
        def moved(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {key: value.to(device, dtype if value.is_floating_point() else value.dtype)
                    for key, value in inputs.items()}

        return Conditioning(moved(self.per_image), None if self.unconditional is None else moved(self.unconditional),
                            self.guidance_scale)

    def unet_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The UNet's sample and keyword inputs for latents `x`: doubled (unconditional first) when guided."""
        if not self.guided:
            return x, dict(self.per_image)
        assert self.unconditional is not None
        kwargs = {key: torch.cat([self.unconditional[key].expand_as(value), value])
                  for key, value in self.per_image.items()}
        return torch.cat([x, x]), kwargs

    def combine(self, eps: torch.Tensor) -> torch.Tensor:
        """Guided noise prediction from the UNet output of `unet_inputs`."""
        if not self.guided:
            return eps
        unconditional, conditional = eps.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)
