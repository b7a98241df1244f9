"""Quantized checkpoints: integer weights packed to their bit width, everything else as it is.

A checkpoint is a folder with `quantized.safetensors` (packed weight codes, scales, zero points, the
remaining full-precision tensors, per-timestep tables) and `quantization.json` (format version, the
QuantConfig, the base model's identity and fingerprint, the safetensors file's SHA-256). It is written to a
staging folder and moved into place, and loading checks both hashes before it touches the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tfmq.errors import TfmqError
from tfmq.files import atomic_directory, write_json
from tfmq.quant.config import QuantConfig
from tfmq.quant.methods.tfmq import restore_temporal_cache
from tfmq.quant.timestep_table import SCHEDULE_KEY, attach_timestep_tables, timestep_tables
from tfmq.quant.wrap import quant_layers, quantize_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "quantized.safetensors"
METADATA_FILE = "quantization.json"
_CODES_SUFFIX = ".codes"


@dataclass
class QuantizationInfo:
    """What a quantized model must remember to be saved and reloaded onto the right base model."""

    config: QuantConfig
    base_fingerprint: str
    base_source: str = ""
    extra: dict = field(default_factory=dict)
    base_config: str = ""  # the config folder a single-file base checkpoint loads with


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's class, config and every tensor of its state: the identity of a base model."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        # keys like `_name_or_path` say where a model was read from, not what it is
        public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes < 2^bits, flattened and packed `bits` bits each, little-endian: two 4-bit codes a byte."""
    flat = codes.flatten().to(torch.uint8).numpy()
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    bit_planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes as uint8."""
    data = packed.numpy()
    if bits == 8:
        return torch.from_numpy(data[:count].copy())
    bit_planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    return torch.from_numpy((bit_planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write `model` (a result of `tfmq.quantize`) to the folder `path`, replacing it whole."""
    info: QuantizationInfo | None = getattr(model, "tfmq_info", None)
    if info is None:
        raise TfmqError("this model was not quantized by tfmq.quantize: nothing to save")
    tables = timestep_tables(model)
    table_scope = "none" if tables is None else tables.scope
    if table_scope != info.config.fsc_scope:
        # load_quantized rebuilds the tables from the config: a mismatch would save an unloadable model
        raise TfmqError(f"the model's timestep tables have scope {table_scope!r}, its config says "
                        f"fsc_scope={info.config.fsc_scope!r}")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    packed_weights = {}
    for name, layer in quant_layers(model):
        bits = layer.weight_quantizer.bits
        if bits is None or bits > 8:
            continue
        codes = layer.weight_quantizer.integer_values(layer.weight)
        del state[f"{name}.weight"]
        state[f"{name}.weight{_CODES_SUFFIX}"] = pack_codes(codes, bits)
        packed_weights[name] = {"bits": bits, "shape": list(layer.weight.shape)}
    base_model = {"source": info.base_source, "fingerprint": info.base_fingerprint, "class": type(model).__name__}
    if info.base_config:
        base_model["config"] = info.base_config
    with atomic_directory(path) as staging:
        save_file(state, str(staging / WEIGHTS_FILE))
        write_json(staging / METADATA_FILE, {
            "format_version": FORMAT_VERSION,
            "quant_config": info.config.to_dict(),
            "base_model": base_model,
            "packed_weights": packed_weights,
            # the sampler timesteps the activation tables serve (also in the weights file, which rules)
            "timestep_schedule": None if tables is None else tables.schedule.tolist(),
            "weights_sha256": _file_sha256(staging / WEIGHTS_FILE),
            "weights_bytes": (staging / WEIGHTS_FILE).stat().st_size,
            **info.extra,
        })
    return Path(path)


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's JSON, after checking that it exists, parses and has this format version."""
    metadata_file = Path(path) / METADATA_FILE
    if not metadata_file.is_file():
        raise TfmqError(f"{path} is not a tfmq quantized checkpoint (no {METADATA_FILE})")
    try:
        metadata = json.loads(metadata_file.read_text())
    except json.JSONDecodeError as exc:
        raise TfmqError(f"{metadata_file} is corrupt: {exc}") from exc
    if metadata.get("format_version") != FORMAT_VERSION:
        raise TfmqError(f"{metadata_file} has format version {metadata.get('format_version')}, "
                        f"this tfmq reads {FORMAT_VERSION}")
    return metadata


def load_quantized(path: str | Path, base: nn.Module) -> nn.Module:
    """Rebuild the quantized model on `base` (its full-precision model), with bit-identical outputs.

    Refuses a checkpoint made from another base model (fingerprint), or whose weights file was changed
    or cut short after saving (SHA-256).
    """
    path = Path(path)
    metadata = read_metadata(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise TfmqError(f"{path} has no {WEIGHTS_FILE}")
    if _file_sha256(weights_file) != metadata.get("weights_sha256"):
        raise TfmqError(f"{weights_file} was modified or truncated after saving (checksum mismatch)")
    fingerprint = model_fingerprint(base)
    expected = metadata["base_model"]["fingerprint"]
    if fingerprint != expected:
        raise TfmqError(f"{path} was quantized from another base model "
                        f"({metadata['base_model'].get('source') or 'unknown'}, fingerprint {expected[:12]}..., "
                        f"given {fingerprint[:12]}...)")
    try:
        config = QuantConfig.from_dict(metadata["quant_config"])
        state = load_file(str(weights_file))
    except (KeyError, ValueError, TypeError) as exc:
        raise TfmqError(f"{path} is corrupt: {exc}") from exc
    model = quantize_model(base, config, init_weight_ranges=False)
    if config.fsc_scope != "none" or config.temporal_cache:
        # The modules the state fills are rebuilt as quantize built them: FSC tables, then feature caches.
        schedule = state.get(SCHEDULE_KEY)
        if schedule is None or schedule.tolist() != metadata.get("timestep_schedule"):
            needs = f"fsc_scope={config.fsc_scope!r}" if config.fsc_scope != "none" else "temporal_cache=True"
            raise TfmqError(f"{path} is corrupt: {needs} needs the timestep schedule, "
                            f"and {SCHEDULE_KEY} is missing or disagrees with {METADATA_FILE}")
        cached_blocks = metadata.get("temporal_cache", {}).get("cached_blocks")
        if config.temporal_cache and (not isinstance(cached_blocks, list)
                                      or not all(isinstance(block, str) for block in cached_blocks)):
            raise TfmqError(f"{path} is corrupt: temporal_cache=True needs the list temporal_cache.cached_blocks "
                            f"in {METADATA_FILE}")
        try:
            if config.fsc_scope != "none":
                attach_timestep_tables(model, schedule, config.fsc_scope)
            if config.temporal_cache:
                restore_temporal_cache(model, schedule, cached_blocks, config.a_bits)
        except ValueError as exc:
            raise TfmqError(f"{path} does not match the model: {exc}") from exc
    for name, packed in metadata["packed_weights"].items():
        codes_key = f"{name}.weight{_CODES_SUFFIX}"
        shape = packed["shape"]
        codes = unpack_codes(state.pop(codes_key), packed["bits"], int(np.prod(shape))).reshape(shape)
        scale = state[f"{name}.weight_quantizer.scale"].view(-1, *([1] * (len(shape) - 1)))
        zero_point = state[f"{name}.weight_quantizer.zero_point"].view_as(scale)
        state[f"{name}.weight"] = (codes.float() - zero_point) * scale
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TfmqError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tfmq_info = QuantizationInfo(config, fingerprint, metadata["base_model"].get("source", ""),
                                       {k: v for k, v in metadata.items() if k not in _STANDARD_KEYS},
                                       metadata["base_model"].get("config", ""))
    return model.eval()


_STANDARD_KEYS = ("format_version", "quant_config", "base_model", "packed_weights", "timestep_schedule",
                  "weights_sha256", "weights_bytes")
