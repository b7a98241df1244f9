import json

import pytest
import torch
from tests.quant.tiny_unets import pixel_unet, unet_inputs

from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler, fashion_ddpm_unet
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import (
    WEIGHTS_FILE,
    load_quantized,
    model_fingerprint,
    pack_codes,
    save_quantized,
    unpack_codes,
)
from tfmq.quant.config import QuantConfig
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
def rtn_model():
    base = pixel_unet()
    calibration = collect_calibration(base, fashion_ddpm_scheduler(), 4, SamplerConfig(steps=6), 3, progress=False)
    return base, quantize(base, QuantConfig(method="rtn", w_bits=4, a_bits=8), calibration, progress=False)


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
    model = quantize(base, QuantConfig(method="rtn", w_bits=4, a_bits=None, weight_init="minmax"), calibration,
                     progress=False)
    save_quantized(model, tmp_path / "q")
    fp32_bytes = sum(p.numel() * 4 for p in base.parameters())
    ratio = fp32_bytes / (tmp_path / "q" / WEIGHTS_FILE).stat().st_size
    metadata = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert ratio > 6.0, ratio
    assert all(entry["bits"] == 4 for entry in metadata["packed_weights"].values())
