from __future__ import annotations

import json

import pytest

from tfmq.errors import TfmqError
from tfmq.quant.config import QuantConfig


def test_defaults_are_the_papers_w4a8_setting() -> None:
    config = QuantConfig()
    assert (config.method, config.w_bits, config.a_bits) == ("tfmq", 4, 8)
    assert (config.weight_init, config.act_init) == ("mse", "mse")
    assert config.keep_fp == ("conv_in", "conv_out")
    assert config.quantize_attention and config.split_shortcut
    assert config.softmax_bits is None


def test_round_trips_through_json() -> None:
    config = QuantConfig(method="qdiff", w_bits=None, a_bits=16, act_init="minmax", keep_fp=("conv_in", "up_blocks.*"),
                         quantize_attention=False, softmax_bits=6, split_shortcut=False)
    restored = QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.keep_fp, tuple)


def test_missing_keys_take_defaults() -> None:
    assert QuantConfig.from_dict({"w_bits": 8}) == QuantConfig(w_bits=8)


def test_keep_fp_list_becomes_a_hashable_tuple() -> None:
    config = QuantConfig(keep_fp=["conv_in"])
    assert config.keep_fp == ("conv_in",)
    hash(config)


def test_softmax_bits_default_to_activation_bits() -> None:
    assert QuantConfig(a_bits=6).attention_probs_bits == 6
    assert QuantConfig(a_bits=8, softmax_bits=4).attention_probs_bits == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("w_bits", 1), ("w_bits", 9), ("w_bits", True), ("w_bits", 4.0), ("w_bits", "4"),
        ("a_bits", 3), ("a_bits", 17), ("softmax_bits", 1), ("softmax_bits", 32),
        ("method", "brecq"), ("weight_init", "percentile"), ("act_init", "max"),
        ("quantize_attention", 1), ("split_shortcut", "yes"), ("keep_fp", "conv_in"), ("keep_fp", (3,)),
        ("tiar", 0), ("temporal_cache", "yes"), ("temporal_selection", None), ("temporal_selection", True),
    ],
)
def test_rejects_bad_value_naming_it(field: str, value: object) -> None:
    with pytest.raises(TfmqError, match=field) as error:  # the error the CLI turns into one line and exit code 2
        QuantConfig(**{field: value})
    assert repr(value) in str(error.value)
    assert isinstance(error.value, ValueError)  # callers catching ValueError keep working


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(TfmqError, match="bits_w"):
        QuantConfig.from_dict({"bits_w": 4})


def test_is_frozen() -> None:
    with pytest.raises(AttributeError):
        QuantConfig().w_bits = 8  # type: ignore[misc]


def test_tfmq_switches_round_trip_and_belong_to_tfmq_only() -> None:
    config = QuantConfig(method="tfmq", tiar=False, temporal_cache=True, temporal_selection=True, fsc_scope="all")
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert (QuantConfig().tiar, QuantConfig().temporal_cache, QuantConfig().temporal_selection) == (True, False, False)
    with pytest.raises(TfmqError, match="temporal_selection=True .* needs temporal_cache=True"):
        QuantConfig(temporal_selection=True)
    for method in ("rtn", "qdiff"):
        with pytest.raises(TfmqError, match=f"tiar=False, temporal_cache=True only apply to method 'tfmq', not '{method}'"):
            QuantConfig(method=method, tiar=False, temporal_cache=True)
        assert QuantConfig(method=method, fsc_scope="temporal").fsc_scope == "temporal"  # FSC is for every method


def test_presets_give_their_lengths_and_fields_override_them() -> None:
    lengths = {name: QuantConfig(recon_preset=name).reconstruction.weight_iters for name in ("fast", "balanced", "paper")}
    assert lengths == {"fast": 200, "balanced": 2_000, "paper": 20_000}
    balanced = QuantConfig(recon_preset="balanced", recon_weight_iters=7).reconstruction
    assert balanced.weight_iters == 7 and balanced.weight_lr == 1e-2 and balanced.act_iters == 50
