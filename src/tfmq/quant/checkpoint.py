"""Quantized checkpoints: integer weights packed to their bit width, everything else as it is.

A checkpoint is a folder with `quantized.safetensors` (packed weight codes, scales, zero points, the
remaining full-precision tensors, per-timestep tables) and `quantization.json`: the format version, the
model's manifest (`tfmq.quant.manifest`: what every quantized module is; loading rebuilds the model from it,
without the method's code), the packed layers, the provenance (`tfmq.quant.provenance`: config, base model,
calibration, the method's results) and the safetensors file's SHA-256.
Each file vouches for the other: the JSON holds the weights file's SHA-256, the weights file's header holds
the SHA-256 of the JSON's canonical form (all but the weights checksum), so an edit to either is refused.
It is written to a staging folder and moved into place. Loading checks the JSON's structure, both digests
and the base model's fingerprint before it builds anything, then that every packed weight is a layer of
the base model with its shape, the manifest's bit width and the bytes those need.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tfmq.errors import TfmqError
from tfmq.files import atomic_directory, write_json
from tfmq.quant.config import WEIGHT_BITS
from tfmq.quant.manifest import ModelManifest
from tfmq.quant.metadata_checks import expect, is_int, shown
from tfmq.quant.nn.temporal import SCHEDULE_KEY
from tfmq.quant.provenance import Provenance, model_fingerprint
from tfmq.quant.wrap import quant_layers

# 2: the weights file's header carries the digest of the metadata (format 1 had none).
# 3: a manifest of the quantized modules, and the provenance (a method's config type) beside it.
FORMAT_VERSION = 3
_OLDER_FORMATS = {1: "its metadata carries no checksum", 2: "it has no manifest of the quantized modules"}
WEIGHTS_FILE = "quantized.safetensors"
METADATA_FILE = "quantization.json"
METADATA_DIGEST_KEY = "tfmq.metadata_sha256"
_CODES_SUFFIX = ".codes"
# The metadata's checksum of the weights file: outside the metadata digest, which the weights file holds.
_WEIGHTS_CHECKSUM_KEYS = ("weights_sha256", "weights_bytes")
_KEYS = ("format_version", "manifest", "packed_weights", "provenance", *_WEIGHTS_CHECKSUM_KEYS)


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


def metadata_digest(metadata: dict) -> str:
    """SHA-256 of the metadata's canonical JSON, its weights checksum left out: what the weights file vouches for."""
    bound = {key: value for key, value in metadata.items() if key not in _WEIGHTS_CHECKSUM_KEYS}
    return hashlib.sha256(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


CHECKPOINT_KIND = "quantized-model"


def save_quantized(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` (a result of `tfmq.quantize`) to the folder `path`, replacing an earlier checkpoint whole
    (anything else there only with `overwrite`, see `tfmq.files`)."""
    info: Provenance | None = getattr(model, "tfmq_info", None)
    if not isinstance(info, Provenance):
        raise TfmqError("this model was not quantized by tfmq.quantize: nothing to save")
    try:
        manifest = ModelManifest.of(model)
    except ValueError as exc:
        raise TfmqError(f"cannot save this model: {exc}") from exc
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    packed_weights = {}
    for name, layer in quant_layers(model):
        bits = layer.weight_quantizer.bits
        if bits is None:
            continue
        codes = layer.weight_quantizer.integer_values(layer.weight)
        del state[f"{name}.weight"]
        state[f"{name}.weight{_CODES_SUFFIX}"] = pack_codes(codes, bits)
        packed_weights[name] = {"bits": bits, "shape": list(layer.weight.shape)}
    metadata = {"format_version": FORMAT_VERSION, "manifest": manifest.to_dict(), "packed_weights": packed_weights,
                "provenance": info.to_dict()}
    # Digested as JSON gives it back (tuples as lists, ...), which is what loading digests.
    metadata = json.loads(json.dumps(metadata))
    with atomic_directory(path, kind=CHECKPOINT_KIND, overwrite=overwrite) as staging:
        weights_file = staging / WEIGHTS_FILE
        save_file(state, str(weights_file), metadata={METADATA_DIGEST_KEY: metadata_digest(metadata)})
        write_json(staging / METADATA_FILE, {**metadata, "weights_sha256": _file_sha256(weights_file),
                                             "weights_bytes": weights_file.stat().st_size})
    return Path(path)


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's metadata, once it is well formed, of this format, and exactly what was saved with these
    weights (both digests): the CLI loads the base model it names, so nothing in it is trusted before."""
    folder = Path(path)
    metadata_file = folder / METADATA_FILE
    if not metadata_file.is_file():
        raise TfmqError(f"{path} is not a tfmq quantized checkpoint (no {METADATA_FILE})")
    metadata = _parsed_metadata(metadata_file)
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise TfmqError(f"{path} has no {WEIGHTS_FILE}")
    if (weights_file.stat().st_size != metadata["weights_bytes"]
            or _file_sha256(weights_file) != metadata["weights_sha256"]):
        raise TfmqError(f"{weights_file} was modified or truncated after saving (checksum mismatch)")
    try:
        with safe_open(str(weights_file), framework="pt") as weights:
            header = weights.metadata() or {}
    except SafetensorError as exc:
        raise TfmqError(f"{weights_file} is not a safetensors file: {str(exc).splitlines()[0]}") from exc
    if header.get(METADATA_DIGEST_KEY) != metadata_digest(metadata):
        raise TfmqError(f"{metadata_file} was modified after saving (it no longer matches the digest in "
                        f"{WEIGHTS_FILE}); restore it or quantize again")
    return metadata


def load_quantized(path: str | Path, base: nn.Module) -> nn.Module:
    """Rebuild the quantized model on `base` (its full-precision model), with bit-identical outputs.

    Refuses a checkpoint made from another base model (fingerprint), one whose weights or metadata were
    changed or cut short after saving (digests), and one whose packed weights do not fit `base`.
    """
    path = Path(path)
    metadata = read_metadata(path)
    provenance = Provenance.from_dict(metadata["provenance"])
    manifest = ModelManifest.from_dict(metadata["manifest"])
    fingerprint = model_fingerprint(base)
    expected = provenance.base_model.fingerprint
    if fingerprint != expected:
        raise TfmqError(f"{path} was quantized from another base model "
                        f"({provenance.base_model.source or 'unknown'}, fingerprint {expected[:12]}..., "
                        f"given {fingerprint[:12]}...)")
    try:
        model = manifest.build(base)
    except ValueError as exc:
        raise TfmqError(f"{path} does not match the model: {exc}") from exc
    state = load_file(str(path / WEIGHTS_FILE))
    if manifest.timestep_tables is not None:
        schedule = state.get(SCHEDULE_KEY)
        if schedule is None or tuple(schedule.tolist()) != manifest.timestep_tables.schedule:
            raise TfmqError(f"{path} is corrupt: its per-timestep tables need the timestep schedule, and "
                            f"{SCHEDULE_KEY} is missing or disagrees with {METADATA_FILE}")
    packed_weights = metadata["packed_weights"]
    _check_packed_layers(packed_weights, model, path)
    for name, packed in packed_weights.items():
        state[f"{name}.weight"] = _unpacked_weight(state, name, packed["bits"], packed["shape"], path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than the model's
        raise TfmqError(f"{path} does not match the model: {str(exc).splitlines()[-1].strip()}") from exc
    if missing or unexpected:
        raise TfmqError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tfmq_info = provenance
    return model.eval()


def _parsed_metadata(metadata_file: Path) -> dict:
    """The JSON of `metadata_file`, refused in one line unless it is this format's, with every standard key of
    the right type."""
    try:
        metadata = json.loads(metadata_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TfmqError(f"{metadata_file} is corrupt: not valid UTF-8 (byte {exc.start})") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise TfmqError(f"{metadata_file} is corrupt: {str(exc) or 'nested too deep'}") from exc
    if not isinstance(metadata, dict):
        raise TfmqError(f"{metadata_file} is corrupt: it holds a JSON {type(metadata).__name__}, not an object")
    version = metadata.get("format_version")
    if not is_int(version):
        raise TfmqError(f"{metadata_file} is corrupt: format_version must be an int, got {shown(version)}")
    if version < FORMAT_VERSION:
        why = _OLDER_FORMATS.get(version, "it is not a format this tfmq knows")
        raise TfmqError(f"{metadata_file} has format version {version} ({why}); this tfmq reads version "
                        f"{FORMAT_VERSION}: quantize the model again")
    if version > FORMAT_VERSION:
        raise TfmqError(f"{metadata_file} has format version {version}, this tfmq reads {FORMAT_VERSION}: "
                        "upgrade tfmq")
    try:
        _check_structure(metadata)
    except ValueError as exc:
        raise TfmqError(f"{metadata_file} is corrupt: {exc}") from exc
    return metadata


def _check_structure(metadata: dict) -> None:
    """Raise ValueError naming the first key of a wrong type or value."""
    missing = [key for key in _KEYS if key not in metadata]
    expect(not missing, f"{', '.join(missing)} missing")
    unknown = sorted(set(metadata) - set(_KEYS))
    expect(not unknown, f"unknown key(s) {', '.join(unknown)}")
    Provenance.from_dict(metadata["provenance"])
    manifest = ModelManifest.from_dict(metadata["manifest"])
    expect(isinstance(metadata["weights_sha256"], str), "weights_sha256 must be a string")
    expect(is_int(metadata["weights_bytes"]), "weights_bytes must be an int")
    packed_weights = metadata["packed_weights"]
    expect(isinstance(packed_weights, dict), f"packed_weights must be an object, got {shown(packed_weights)}")
    for name, packed in packed_weights.items():
        entry = f"packed_weights[{shown(name)}]"
        expect(isinstance(packed, dict) and set(packed) == {"bits", "shape"},
               f"{entry} must be an object of bits and shape, got {shown(packed)}")
        bits, shape = packed["bits"], packed["shape"]
        expect(is_int(bits) and bits in WEIGHT_BITS,
               f"{entry}.bits must be an int in {WEIGHT_BITS.start}..{WEIGHT_BITS.stop - 1}, got {shown(bits)}")
        layer = manifest.plan.layers.get(name)
        expect(layer is not None, f"{entry} is not a quantized layer of the manifest")
        expect(bits == layer.w_bits, f"{entry} has {bits} bits, " + (
            "but the manifest leaves the layer's weights in full precision" if layer.w_bits is None
            else f"the manifest gives the layer {layer.w_bits}"))
        expect(isinstance(shape, list) and len(shape) > 0 and all(is_int(size) and size > 0 for size in shape),
               f"{entry}.shape must be a list of positive ints, got {shown(shape)}")
    unpacked = [name for name, layer in manifest.plan.layers.items()
                if layer.w_bits is not None and name not in packed_weights]
    expect(not unpacked, f"no packed weight for the quantized layer {unpacked[0] if unpacked else ''}")
    for entry, name in ((manifest.temporal_caches, "temporal_caches"),
                        (manifest.output_correction, "output_correction")):
        expect(entry is None or manifest.timestep_tables is not None,
               f"manifest.{name} needs manifest.timestep_tables (its schedule)")


def _check_packed_layers(packed_weights: dict, model: nn.Module, path: Path) -> None:
    """Every packed weight is a quantized layer of `model` with its weight's shape, and every quantized layer's
    weight of some bit width is packed."""
    layers = {name: layer for name, layer in quant_layers(model) if layer.weight_quantizer.bits is not None}
    unknown = sorted(set(packed_weights) - set(layers))
    if unknown:
        raise TfmqError(f"{path} is corrupt: packed weight {shown(unknown[0])} is not a quantized layer of "
                        f"{type(model).__name__}")
    unpacked = sorted(set(layers) - set(packed_weights))
    if unpacked:
        raise TfmqError(f"{path} is corrupt: no packed weight for the quantized layer {unpacked[0]}")
    for name, packed in packed_weights.items():
        shape = list(layers[name].weight.shape)
        if packed["shape"] != shape:
            raise TfmqError(f"{path} is corrupt: packed weight {name} has shape {shown(packed['shape'])}, the "
                            f"base model's layer {shape}")


def _unpacked_weight(state: dict[str, torch.Tensor], name: str, bits: int, shape: list[int],
                     path: Path) -> torch.Tensor:
    """The fake-quant weight of layer `name` from its packed codes, scale and zero point (popping the codes)."""
    codes_key = f"{name}.weight{_CODES_SUFFIX}"
    packed = state.pop(codes_key, None)
    count = math.prod(shape)
    needed = -(-count * bits // 8)
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != needed:
        found = "nothing" if packed is None else f"{packed.numel()} {packed.dtype} values"
        raise TfmqError(f"{path} is corrupt: {codes_key} holds {found}, {bits}-bit codes of shape {shape} take "
                        f"{needed} bytes")
    scale = state.get(f"{name}.weight_quantizer.scale")
    zero_point = state.get(f"{name}.weight_quantizer.zero_point")
    if scale is None or zero_point is None or scale.numel() != shape[0] or zero_point.numel() != shape[0]:
        raise TfmqError(f"{path} is corrupt: {name} needs a weight scale and zero point per output channel")
    codes = unpack_codes(packed, bits, count).reshape(shape)
    channel_shape = (-1, *([1] * (len(shape) - 1)))
    return (codes.float() - zero_point.view(channel_shape)) * scale.view(channel_shape)
