"""What an exported graph remembers about itself, in the ONNX file's metadata_props (keys `tfmq.*`): enough
for `OnnxUNet` and the CLI to call it right without the torch model, and a digest of the graph and of those
props, so that a graph changed after export (a flipped weight byte, an edited schedule) is refused.

A graph past protobuf's 2 GB keeps its weights in one external data file beside it (`unet.onnx.data`); its
name, size and SHA-256 are a prop (`tfmq.external_data`), so the digest covers the data file too."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfmq.errors import TfmqError

PREFIX = "tfmq."
DIGEST_KEY = PREFIX + "sha256"
DATA_KEY = PREFIX + "external_data"
DATA_SUFFIX = ".data"
_HASH_CHUNK_BYTES = 1 << 24
FORMATS = ("int8", "fp32")
# The graph's inputs and output. An integer graph reads the step index (position of t in `schedule`),
# a full-precision graph the timestep itself.
SAMPLE, STEP, TIMESTEP, OUTPUT = "sample", "step", "timestep", "noise"
# The condition input, if any: a text-conditional model's, a DiT's.
ENCODER_HIDDEN_STATES, CLASS_LABELS = "encoder_hidden_states", "class_labels"


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


def data_file_of(path: str | Path) -> Path:
    """Where the graph at `path` keeps its weights when they are external: beside it, named after it."""
    path = Path(path)
    return path.with_name(path.name + DATA_SUFFIX)


def data_record(data_file: Path) -> str:
    """The `tfmq.external_data` prop of a graph whose weights tfmq wrote to `data_file`."""
    return json.dumps({"file": data_file.name, "bytes": data_file.stat().st_size, "sha256": file_sha256(data_file)})


def file_sha256(path: Path) -> str:
    """Read in chunks: a data file may hold more than memory can spare twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_external_data(model: Any, path: Path) -> Path | None:
    """Refuse a graph (loaded without its external data, digest checked) whose data file is missing, changed
    or not the one tfmq wrote beside it; returns that file, or None for a graph that holds its weights."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    props = {prop.key: prop.value for prop in model.metadata_props}
    locations = {ExternalDataInfo(tensor).location for tensor in model.graph.initializer if uses_external_data(tensor)}
    if DATA_KEY not in props:
        if locations:
            raise TfmqError(f"{path} refers to external data tfmq did not write ({', '.join(sorted(locations))}): "
                            "export it again with this tfmq")
        return None
    try:
        record = json.loads(props[DATA_KEY])
        name, size, sha256 = record["file"], record["bytes"], record["sha256"]
    except (ValueError, TypeError, KeyError) as exc:
        raise TfmqError(f"{path} has corrupt tfmq metadata: {DATA_KEY} ({exc})") from exc
    data_file = data_file_of(path)
    if name != data_file.name or locations - {name}:
        raise TfmqError(f"{path} keeps its weights in {', '.join(sorted(locations | {name}))}, not in {data_file.name} "
                        "beside it: export it again")
    if not data_file.is_file():
        raise TfmqError(f"{path} keeps its weights in {data_file}, which is missing: copy it beside the graph, "
                        "or export again")
    if data_file.stat().st_size != size or file_sha256(data_file) != sha256:
        raise TfmqError(f"{data_file} was modified after export (its content no longer matches the tfmq digest of "
                        f"{path.name}): export it again")
    return data_file


def owned_data_file(path: str | Path) -> bool:
    """Whether the data file beside `path` is the one the tfmq graph at `path` refers to: one an export may
    replace or remove."""
    model = _tfmq_graph(Path(path))
    records = [] if model is None else [prop.value for prop in model.metadata_props if prop.key == DATA_KEY]
    try:
        return [json.loads(record)["file"] for record in records] == [data_file_of(path).name]
    except (ValueError, TypeError, KeyError):
        return False


def owned_graph(path: Path) -> bool:
    """An ONNX file tfmq exported (its metadata has tfmq's keys): one an export may replace."""
    return _tfmq_graph(Path(path)) is not None


def _tfmq_graph(path: Path) -> Any:
    """The graph at `path` without its external data, if tfmq wrote it; else None."""
    from tfmq.export.dependencies import require

    onnx = require("onnx")
    if not path.is_file():
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and onnx's own: not a graph, so not ours
        return None
    return model if any(prop.key.startswith(PREFIX) for prop in model.metadata_props) else None
