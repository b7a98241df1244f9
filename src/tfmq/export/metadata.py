"""What an exported graph remembers about itself, in the ONNX file's metadata_props (keys `tfmq.*`): enough
for `OnnxUNet` and the CLI to call it right without the torch model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tfmq.errors import TfmqError

PREFIX = "tfmq."
# The graph's inputs and output. An integer graph reads the step index (position of t in `schedule`),
# a full-precision graph the timestep itself.
SAMPLE, STEP, TIMESTEP, ENCODER_HIDDEN_STATES, OUTPUT = "sample", "step", "timestep", "encoder_hidden_states", "noise"


@dataclass(frozen=True)
class GraphInfo:
    """`format` ("int8" or "fp32"), the UNet's class and diffusers config, the schedule an integer graph
    serves (sampler timesteps in order), and free-form `details` (exactness counts, the quant config, and
    whatever the caller added, e.g. the sampler)."""

    format: str
    unet_class: str
    unet_config: dict[str, Any]
    schedule: list[int] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def timestep_input(self) -> str:
        return TIMESTEP if self.schedule is None else STEP

    def to_props(self) -> dict[str, str]:
        return {PREFIX + key: json.dumps(value, default=str) for key, value in (
            ("format", self.format), ("unet_class", self.unet_class), ("unet_config", self.unet_config),
            ("schedule", self.schedule), ("details", self.details))}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> GraphInfo:
        try:
            values = {key[len(PREFIX):]: json.loads(value) for key, value in props.items() if key.startswith(PREFIX)}
            return cls(values["format"], values["unet_class"], values["unet_config"], values.get("schedule"),
                       values.get("details") or {})
        except (KeyError, ValueError) as exc:
            raise TfmqError(f"{source} is not an ONNX graph exported by tfmq (metadata {exc} missing or corrupt)") \
                from exc
