"""A method defined here, outside the package, registered the public way: it quantizes, saves and loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tfmq
from tests.quant.tiny_unets import pixel_unet, unet_inputs
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.checkpoint import METADATA_FILE
from tfmq.quant.config import CONFIG_TYPES
from tfmq.quant.wrap import activation_quantizers
from tfmq.sampling import SamplerConfig


@dataclass(frozen=True)
class ShrunkRangesConfig(tfmq.QuantConfig, method="shrunk-ranges"):
    """A toy method: RTN whose activation steps are then scaled by `shrink` (clipping more outliers)."""

    shrink: float = 0.5


@tfmq.register_method(ShrunkRangesConfig)
def quantize_with_shrunk_ranges(model: nn.Module, inputs: tfmq.MethodInputs) -> dict[str, Any]:
    shrunk = 0
    for _, quantizer in activation_quantizers(model):
        if quantizer.bits is not None:
            quantizer.scale.data *= inputs.config.shrink
            shrunk += 1
    inputs.calibrate_timestep_tables(model)
    return {"shrunk_quantizers": shrunk}


@pytest.fixture(scope="module")
def calibration() -> tfmq.CalibrationSet:
    return tfmq.collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 3, SamplerConfig(steps=6), 2,
                                    progress=False)


def test_a_method_registered_outside_the_package_quantizes_saves_and_loads(tmp_path, calibration) -> None:
    config = ShrunkRangesConfig(w_bits=8, a_bits=8, shrink=0.25)
    base = pixel_unet()
    model = tfmq.quantize(base, config, calibration, progress=False)
    rtn = tfmq.quantize(base, tfmq.RTNConfig(w_bits=8, a_bits=8), calibration, progress=False)
    name, quantizer = next(iter(activation_quantizers(model)))
    assert torch.allclose(quantizer.scale, 0.25 * dict(activation_quantizers(rtn))[name].scale)

    path = tfmq.save_quantized(model, tmp_path / "toy")
    provenance = json.loads((path / METADATA_FILE).read_text())["provenance"]
    assert provenance["quant_config"]["method"] == "shrunk-ranges" and provenance["quant_config"]["shrink"] == 0.25
    assert provenance["method_results"]["shrunk_quantizers"] > 0
    loaded = tfmq.load_quantized(path, pixel_unet())
    assert loaded.tfmq_info.config == config
    inputs = unet_inputs(base, 2, seed=3)
    inputs["timestep"] = torch.tensor([calibration.schedule[0]] * 2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, loaded(**inputs).sample)
        assert not torch.equal(model(**inputs).sample, rtn(**inputs).sample)


def test_its_checkpoint_loads_where_the_method_is_unknown(tmp_path, calibration, monkeypatch) -> None:
    """The manifest rebuilds the model: loading needs neither the method's config type nor its handler."""
    config = ShrunkRangesConfig(w_bits=4, a_bits=8, fsc_scope="temporal")
    model = tfmq.quantize(pixel_unet(), config, calibration, progress=False)
    path = tfmq.save_quantized(model, tmp_path / "toy")
    monkeypatch.delitem(CONFIG_TYPES, "shrunk-ranges")  # as in a process that never defined the method
    loaded = tfmq.load_quantized(path, pixel_unet())
    assert loaded.tfmq_info.config == {**config.to_dict(), "layers": [rule.to_dict() for rule in config.layers]}
    assert loaded.tfmq_info.method == "shrunk-ranges"
    inputs = unet_inputs(pixel_unet(), 2, seed=4)
    with torch.no_grad():
        for timestep in calibration.schedule[::2].tolist():
            assert torch.equal(model(**{**inputs, "timestep": timestep}).sample,
                               loaded(**{**inputs, "timestep": timestep}).sample)


def test_a_subclass_runs_the_handler_of_its_nearest_registered_base(calibration) -> None:
    @dataclass(frozen=True)
    class LabelledRTN(tfmq.RTNConfig):
        """No method name of its own: it is RTN, and quantizes as RTN does."""

    assert LabelledRTN.method == "rtn"
    model = tfmq.quantize(pixel_unet(), LabelledRTN(w_bits=8, a_bits=8), calibration, progress=False)
    assert model.tfmq_info.config.method == "rtn"


def test_a_config_without_handler_or_method_is_refused_in_one_line(calibration) -> None:
    @dataclass(frozen=True)
    class Unregistered(tfmq.QuantConfig, method="unregistered-toy"):
        pass

    with pytest.raises(tfmq.TfmqError, match="no method is registered for Unregistered"):
        tfmq.quantize(pixel_unet(), Unregistered(), calibration, progress=False)
    with pytest.raises(tfmq.TfmqError, match="QuantConfig subclass declared with method"):
        tfmq.register_method(dict)
    with pytest.raises(tfmq.TfmqError, match="must be a method's QuantConfig"):
        tfmq.quantize(pixel_unet(), {"method": "rtn"}, calibration, progress=False)
