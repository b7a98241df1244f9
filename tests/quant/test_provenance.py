"""The provenance: a typed record of where a quantized model came from, saved beside its manifest."""

from __future__ import annotations

import json

import pytest

from tests.quant.tiny_unets import pixel_unet
from tfmq.quant.config import TFMQConfig
from tfmq.quant.provenance import BaseModel, Provenance, model_fingerprint


def test_it_round_trips_with_a_typed_config_and_records_the_base_model() -> None:
    base = pixel_unet()
    record = Provenance.of(TFMQConfig(temporal_cache=True), base, source="fashion-ddpm", config_folder="cfg",
                           calibration={"samples": 4}, method_results={"reconstruction": []})
    assert record.base_model == BaseModel("fashion-ddpm", model_fingerprint(base), "UNet2DModel", "cfg")
    restored = Provenance.from_dict(json.loads(json.dumps(record.to_dict())))
    assert restored == record and isinstance(restored.config, TFMQConfig) and restored.method == "tfmq"


def test_a_config_of_an_unknown_method_stays_a_dict() -> None:
    values = Provenance.of(TFMQConfig(), pixel_unet()).to_dict()
    values["quant_config"] = {"method": "defined-elsewhere", "strength": 3}
    restored = Provenance.from_dict(values)
    assert restored.config == {"method": "defined-elsewhere", "strength": 3} and restored.method == "defined-elsewhere"


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda values: values.pop("calibration"), "provenance must be an object of"),
    (lambda values: values.update(quant_config={"w_bits": 4}), "quant_config must be an object naming its method"),
    (lambda values: values["quant_config"].update(w_bits=1), "quant_config: w_bits must be an int in 2..8"),
    (lambda values: values["base_model"].pop("class"), "base_model.class must be a string"),
    (lambda values: values.update(method_results=[]), "method_results must be an object"),
])
def test_bad_entries_are_refused_naming_them(edit, problem) -> None:
    values = Provenance.of(TFMQConfig(), pixel_unet()).to_dict()
    edit(values)
    with pytest.raises(ValueError, match=problem):
        Provenance.from_dict(values)
