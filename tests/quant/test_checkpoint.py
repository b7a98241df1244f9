import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.quant.tiny_unets import pixel_unet, unet_inputs

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler, fashion_ddpm_unet
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import (
    METADATA_DIGEST_KEY,
    METADATA_FILE,
    WEIGHTS_FILE,
    load_quantized,
    metadata_digest,
    model_fingerprint,
    pack_codes,
    save_quantized,
    unpack_codes,
)
from tfmq.quant.config import RTNConfig
from tfmq.sampling import SamplerConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_round_trips_and_uses_bits_per_code(bits):
    codes = torch.randint(0, 2**bits, (7, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).reshape(7, 13), codes)


def test_four_bit_codes_share_a_byte_low_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 15], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]


def test_code_too_large_for_its_bits_is_refused():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)


@pytest.fixture(scope="module")
def calibration():
    return collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 4, SamplerConfig(steps=6), 3, progress=False)


@pytest.fixture(scope="module")
def rtn_model(calibration):
    base = pixel_unet()
    return base, quantize(base, RTNConfig(w_bits=4, a_bits=8), calibration, progress=False)


@pytest.fixture(scope="module")
def rtn_w8(calibration):
    return quantize(pixel_unet(), RTNConfig(w_bits=8, a_bits=8), calibration, progress=False)


def test_save_then_load_gives_bit_identical_outputs(tmp_path, rtn_model):
    base, model = rtn_model
    save_quantized(model, tmp_path / "q")
    reloaded = load_quantized(tmp_path / "q", pixel_unet())
    inputs = unet_inputs(base, 3, seed=5)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, reloaded(**inputs).sample)
    assert reloaded.tfmq_info.config == model.tfmq_info.config


def test_loading_onto_another_base_model_is_refused(tmp_path, rtn_model):
    save_quantized(rtn_model[1], tmp_path / "q")
    with pytest.raises(TfmqError, match="another base model"):
        load_quantized(tmp_path / "q", pixel_unet(seed=1))


def test_tampered_or_truncated_weights_are_refused(tmp_path, rtn_model):
    save_quantized(rtn_model[1], tmp_path / "q")
    weights = tmp_path / "q" / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(TfmqError, match="modified or truncated"):
        load_quantized(tmp_path / "q", pixel_unet())
    weights.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(TfmqError, match="modified or truncated"):
        load_quantized(tmp_path / "q", pixel_unet())


def test_corrupt_metadata_and_missing_checkpoint(tmp_path, rtn_model):
    with pytest.raises(TfmqError, match="not a tfmq quantized checkpoint"):
        load_quantized(tmp_path, pixel_unet())
    save_quantized(rtn_model[1], tmp_path / "q")
    (tmp_path / "q" / "quantization.json").write_text("{ not json")
    with pytest.raises(TfmqError, match="corrupt"):
        load_quantized(tmp_path / "q", pixel_unet())


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(TfmqError):
        save_quantized(pixel_unet(), tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_ignores_where_a_model_was_read_from():
    first, second = pixel_unet(), pixel_unet()
    second.register_to_config(_name_or_path="/somewhere/else")
    assert model_fingerprint(first) == model_fingerprint(second)
    with torch.no_grad():
        second.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(first) != model_fingerprint(second)


def test_packed_w4_file_is_over_6x_smaller_than_the_fp32_unet(tmp_path):
    """On the shipped architecture (2.8 M parameters, random weights): the size users get."""
    base = fashion_ddpm_unet()
    calibration = collect_calibration(base, fashion_ddpm_scheduler(), 2, SamplerConfig(steps=2), 1, progress=False)
    model = quantize(base, RTNConfig(w_bits=4, a_bits=None, weight_init="minmax"), calibration,
                     progress=False)
    save_quantized(model, tmp_path / "q")
    fp32_bytes = sum(p.numel() * 4 for p in base.parameters())
    ratio = fp32_bytes / (tmp_path / "q" / WEIGHTS_FILE).stat().st_size
    metadata = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert ratio > 6.0, ratio
    assert all(entry["bits"] == 4 for entry in metadata["packed_weights"].values())


# Editing a checkpoint's metadata. Unsigned: as a user with a text editor does. Re-signed: as a writer that
# signs what it writes would (the weights file's digest of the metadata and the metadata's checksum of the
# weights follow the edit), which leaves the checks of the content itself to refuse it.

def rewrite_metadata(folder: Path, edit: Callable[[dict], None], *, resign: bool = False) -> None:
    metadata_file = folder / METADATA_FILE
    metadata = json.loads(metadata_file.read_text())
    edit(metadata)
    if resign:
        weights = folder / WEIGHTS_FILE
        save_file(load_file(str(weights)), str(weights), metadata={METADATA_DIGEST_KEY: metadata_digest(metadata)})
        metadata["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        metadata["weights_bytes"] = weights.stat().st_size
    metadata_file.write_text(json.dumps(metadata))


def parent_of(metadata: dict, key_path: str) -> tuple[dict, str]:
    """The object holding a dotted path's last key (e.g. "provenance.quant_config.w_bits"), and that key."""
    *parents, last = key_path.split(".")
    for key in parents:
        metadata = metadata[key]
    return metadata, last


def assign(key_path: str, value: object) -> Callable[[dict], None]:
    def edit(metadata: dict) -> None:
        parent, key = parent_of(metadata, key_path)
        parent[key] = value
    return edit


def delete(key_path: str) -> Callable[[dict], None]:
    def edit(metadata: dict) -> None:
        parent, key = parent_of(metadata, key_path)
        del parent[key]
    return edit


def claim_bits(bits: int) -> Callable[[dict], None]:
    """The manifest and every packed weight say `bits`: a consistent lie."""
    def edit(metadata: dict) -> None:
        for name, packed in metadata["packed_weights"].items():
            packed["bits"] = bits
            metadata["manifest"]["layers"][name]["w_bits"] = bits
    return edit


def first_manifest_layer(change: Callable[[dict], None]) -> Callable[[dict], None]:
    """An edit of the manifest's entry of the first packed layer."""
    return lambda metadata: change(metadata["manifest"]["layers"][next(iter(metadata["packed_weights"]))])


def rename_first_manifest_layer(name: str) -> Callable[[dict], None]:
    """The first packed layer under another name, in the manifest and the packed weights alike."""
    def edit(metadata: dict) -> None:
        layers, packed = metadata["manifest"]["layers"], metadata["packed_weights"]
        old = next(iter(packed))
        layers[name], packed[name] = layers.pop(old), packed.pop(old)
    return edit


def first_packed(change: Callable[[dict], None]) -> Callable[[dict], None]:
    """An edit of the first packed weight's entry."""
    return lambda metadata: change(next(iter(metadata["packed_weights"].values())))


def rename_first_packed(name: str) -> Callable[[dict], None]:
    def edit(metadata: dict) -> None:
        packed = metadata["packed_weights"]
        packed[name] = packed.pop(next(iter(packed)))
    return edit


def assert_refused(folder: Path, fragment: str) -> None:
    with pytest.raises(TfmqError) as caught:
        load_quantized(folder, pixel_unet())
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message


def test_a_resigned_but_unchanged_checkpoint_loads_bit_identically(tmp_path, rtn_model):
    base, model = rtn_model
    path = save_quantized(model, tmp_path / "q")
    rewrite_metadata(path, lambda metadata: None, resign=True)
    inputs = unet_inputs(base, 3, seed=5)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, load_quantized(path, pixel_unet())(**inputs).sample)


MODIFIED = "was modified after saving"


@pytest.mark.parametrize("checkpoint, edit, resign, fragment", [
    # W4 read as W8: one manifest value, which its packed entry contradicts
    pytest.param("w4", first_manifest_layer(assign("w_bits", 8)), False, "has 4 bits, the manifest gives the layer 8",
                 id="w_bits-8"),
    pytest.param("w4", first_manifest_layer(assign("w_bits", 8)), True, "has 4 bits, the manifest gives the layer 8",
                 id="w_bits-8-resigned"),
    # the config explains the model; the manifest builds it: a config edit alone is caught by the digest
    pytest.param("w4", assign("provenance.quant_config.w_bits", 8), False, MODIFIED, id="config-w_bits-8"),
    # W8 claiming W4 everywhere: consistent, but not what was saved, nor what the codes' bytes hold
    pytest.param("w8", claim_bits(4), False, MODIFIED, id="w8-claims-w4"),
    pytest.param("w8", claim_bits(4), True, "4-bit codes of shape", id="w8-claims-w4-resigned"),
    pytest.param("w4", first_packed(assign("bits", 3)), True, "has 3 bits, the manifest gives the layer 4",
                 id="bits-3"),
    pytest.param("w4", claim_bits(2), False, MODIFIED, id="w_bits-2"),
    pytest.param("w4", claim_bits(2), True, "2-bit codes of shape", id="w_bits-2-resigned"),
    # a value every check but the digest accepts
    pytest.param("w4", first_manifest_layer(assign("a_bits", 6)), False, MODIFIED, id="a_bits-6"),
])
def test_edited_bit_widths_are_refused(tmp_path, rtn_model, rtn_w8, checkpoint, edit, resign, fragment):
    path = save_quantized(rtn_model[1] if checkpoint == "w4" else rtn_w8, tmp_path / "q")
    rewrite_metadata(path, edit, resign=resign)
    assert_refused(path, fragment)


@pytest.mark.parametrize("edit, resign, fragment", [
    pytest.param(delete("packed_weights"), False, "packed_weights missing", id="no-packed_weights"),
    pytest.param(delete("manifest"), False, "manifest missing", id="no-manifest"),
    pytest.param(assign("extra", 1), False, "unknown key(s) extra", id="unknown-key"),
    pytest.param(assign("provenance.base_model", "fashion-ddpm"), False, "base_model must be an object",
                 id="base_model-string"),
    pytest.param(delete("provenance.base_model.fingerprint"), False, "base_model.fingerprint must be a string",
                 id="no-fingerprint"),
    pytest.param(assign("provenance.quant_config", [4, 8]), False, "quant_config must be an object",
                 id="quant_config-list"),
    pytest.param(assign("provenance.quant_config.w_bits", "4"), False, "w_bits must be an int", id="w_bits-string"),
    pytest.param(assign("provenance.quant_config.layers", 5), False, "quant_config:", id="layers-int"),
    pytest.param(assign("provenance.quant_config.tiar", False), False,
                 "quant_config: tiar is a setting of method tfmq", id="field-of-another-method"),
    pytest.param(assign("manifest.layers", []), False, "manifest.layers must be an object", id="layers-list"),
    pytest.param(first_manifest_layer(assign("split", -1)), False, "split must be a positive int",
                 id="negative-split"),
    pytest.param(first_manifest_layer(delete("a_bits")), False, "must be an object of a_bits, split, w_bits",
                 id="layer-without-a_bits"),
    pytest.param(first_packed(assign("bits", True)), False, "bits must be an int in 2..8", id="bits-bool"),
    pytest.param(first_packed(assign("shape", "big")), False, "shape must be a list of positive ints",
                 id="shape-string"),
    pytest.param(first_packed(delete("shape")), False, "must be an object of bits and shape",
                 id="entry-without-shape"),
    pytest.param(assign("packed_weights", []), False, "packed_weights must be an object", id="packed_weights-list"),
    pytest.param(assign("manifest.timestep_tables", "all"), False, "manifest.timestep_tables must be an object",
                 id="tables-string"),
    pytest.param(assign("manifest.temporal_caches", {"blocks": ["mid_block.resnets.0"], "code_dtype": "uint8",
                                                     "time_embedding_skipped": False}), False,
                 "temporal_caches needs manifest.timestep_tables", id="caches-without-schedule"),
    pytest.param(assign("weights_bytes", "12"), False, "weights_bytes must be an int", id="weights_bytes-string"),
    pytest.param(assign("format_version", "2"), False, "format_version must be an int", id="format_version-string"),
    # well-formed, re-signed, and still not this model's
    pytest.param(rename_first_packed("../../etc/passwd"), True, "['../../etc/passwd'] is not a quantized layer",
                 id="path-as-name"),
    pytest.param(rename_first_packed("down_blocks.7.resnets.0.conv1"), True, "is not a quantized layer",
                 id="unknown-module"),
    pytest.param(rename_first_packed("conv_in"), True, "is not a quantized layer", id="kept-layer"),
    pytest.param(rename_first_manifest_layer("../../etc/passwd"), True, "does not match the model: ../../etc/passwd",
                 id="manifest-path-as-name"),
    pytest.param(rename_first_manifest_layer("conv_in"), True, "packed weight conv_in has shape [32, 8], the base "
                 "model's layer [8, 3, 3, 3]", id="manifest-kept-layer"),
    pytest.param(rename_first_manifest_layer("down_blocks.0.resnets.0.norm1"), True,
                 "is a GroupNorm, not a Conv2d or Linear", id="manifest-norm-as-layer"),
    pytest.param(first_manifest_layer(assign("split", 1)), True, "does not match the model", id="manifest-split"),
    pytest.param(lambda metadata: metadata["packed_weights"].popitem(), True,
                 "no packed weight for the quantized layer", id="layer-unpacked"),
    pytest.param(first_packed(assign("shape", [10**9, 10**9])), True,
                 "has shape [1000000000, 1000000000], the base model's", id="huge-shape"),
    pytest.param(first_manifest_layer(assign("w_bits", None)), True,
                 "but the manifest leaves the layer's weights in full precision", id="manifest-layer-fp"),
])
def test_malformed_metadata_is_a_one_line_error(tmp_path, rtn_w8, edit, resign, fragment):
    path = save_quantized(rtn_w8, tmp_path / "q")
    rewrite_metadata(path, edit, resign=resign)
    assert_refused(path, fragment)


@pytest.mark.parametrize("content, fragment", [
    pytest.param(b"[1, 2]", "holds a JSON list, not an object", id="list"),
    pytest.param(b'{"format_version": 2, "base_model": "\xff"}', "not valid UTF-8", id="latin-1"),
    pytest.param(b"[" * 100_000, "corrupt", id="nested-too-deep"),
])
def test_metadata_that_is_no_json_object_is_a_one_line_error(tmp_path, rtn_model, content, fragment):
    path = save_quantized(rtn_model[1], tmp_path / "q")
    (path / METADATA_FILE).write_bytes(content)
    assert_refused(path, fragment)


@pytest.mark.parametrize("version, fragment", [(1, "quantize the model again"), (2, "has no manifest"),
                                               (4, "upgrade tfmq")])
def test_other_format_versions_are_refused_by_name(tmp_path, rtn_model, version, fragment):
    path = save_quantized(rtn_model[1], tmp_path / "q")
    rewrite_metadata(path, assign("format_version", version), resign=True)
    assert_refused(path, f"format version {version}")
    assert_refused(path, fragment)
