"""What an exported graph remembers about itself, in the ONNX file's metadata_props (keys `tfmq.*`): enough
for `OnnxUNet` and the CLI to call it right without the torch model, and a digest of the graph and of those
props, so that a graph changed after export (a flipped weight byte, an edited schedule) is refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfmq.errors import TfmqError

PREFIX = "tfmq."
DIGEST_KEY = PREFIX + "sha256"
FORMATS = ("int8", "fp32")
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
        """The info of a graph's props, refused in one line unless every value is of its kind."""
        try:
            values = {key[len(PREFIX):]: json.loads(value) for key, value in props.items()
                      if key.startswith(PREFIX) and key != DIGEST_KEY}
            info = cls(values["format"], values["unet_class"], values["unet_config"], values.get("schedule"),
                       values.get("details", {}))
        except (KeyError, ValueError) as exc:
            raise TfmqError(f"{source} is not an ONNX graph exported by tfmq (metadata {exc} missing or corrupt)") \
                from exc
        problem = info._problem()
        if problem is not None:
            raise TfmqError(f"{source} has corrupt tfmq metadata: {problem}")
        return info

    def _problem(self) -> str | None:
        if self.format not in FORMATS:
            return f"format must be one of {', '.join(FORMATS)}, got {self.format!r:.40}"
        if not isinstance(self.unet_class, str):
            return f"unet_class must be a string, got a {type(self.unet_class).__name__}"
        if not isinstance(self.unet_config, dict):
            return f"unet_config must be a JSON object, got a {type(self.unet_config).__name__}"
        schedule = self.schedule
        if schedule is not None and not (
                isinstance(schedule, list) and schedule
                and all(isinstance(t, int) and not isinstance(t, bool) for t in schedule)):
            return f"schedule must be a non-empty list of ints, got {schedule!r:.40}"
        if self.format == "int8" and schedule is None:
            return "an int8 graph needs the schedule it serves"
        if self.format == "fp32" and schedule is not None:
            return "an fp32 graph serves any timestep: it has no schedule"
        if not isinstance(self.details, dict):
            return f"details must be a JSON object, got a {type(self.details).__name__}"
        return None


def graph_digest(model: Any) -> str:
    """SHA-256 of what decides a graph's outputs and how tfmq calls it: the graph (nodes, initializers, inputs),
    its opsets and local functions, and every `tfmq.*` prop but the digest itself."""
    digest = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for part in (*model.opset_import, *model.functions):
        digest.update(part.SerializeToString(deterministic=True))
    props = {prop.key: prop.value for prop in model.metadata_props if prop.key.startswith(PREFIX)
             and prop.key != DIGEST_KEY}
    digest.update(json.dumps(props, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def check_digest(model: Any, source: str) -> None:
    """Refuse a graph whose digest is missing (exported before tfmq wrote one) or differs from its content."""
    stored = [prop.value for prop in model.metadata_props if prop.key == DIGEST_KEY]
    if not stored:
        raise TfmqError(f"{source} carries no tfmq digest (exported by an older tfmq, or not by tfmq): export it "
                        "again with this tfmq")
    if stored != [graph_digest(model)]:
        raise TfmqError(f"{source} was modified after export (its content no longer matches its tfmq digest): "
                        "export it again")


def owned_graph(path: Path) -> bool:
    """An ONNX file tfmq exported (its metadata has tfmq's keys): one an export may replace."""
    from tfmq.export.dependencies import require

    onnx = require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and onnx's own: not a graph, so not ours
        return False
    return any(prop.key.startswith(PREFIX) for prop in model.metadata_props)
