from __future__ import annotations

import dataclasses
import json

import pytest

from tfmq.errors import TfmqError
from tfmq.quant.config import (
    CONFIG_TYPES,
    LayerRule,
    QDiffusionConfig,
    QuantConfig,
    RTNConfig,
    TFMQConfig,
    config_for,
)


def _round_trip(config: QuantConfig) -> QuantConfig:
    return QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))


def test_each_method_is_a_config_type_named_by_its_method() -> None:
    assert {name: kind for name, kind in CONFIG_TYPES.items() if name in ("rtn", "qdiff", "tfmq")} == {
        "rtn": RTNConfig, "qdiff": QDiffusionConfig, "tfmq": TFMQConfig}
    assert (RTNConfig.method, QDiffusionConfig.method, TFMQConfig.method) == ("rtn", "qdiff", "tfmq")
    with pytest.raises(TfmqError, match="names no method"):
        QuantConfig()


def test_defaults_are_the_clis_w4a8_setting() -> None:
    config = TFMQConfig()
    assert (config.w_bits, config.a_bits, config.weight_init, config.act_init) == (4, 8, "mse", "mse")
    assert config.layers == tuple(LayerRule.full_precision(name) for name in
                                  ("conv_in", "conv_out", "pos_embed.proj", "proj_out_2", "proj_out"))
    assert config.quantize_attention and config.split_shortcut and config.softmax_bits is None
    assert (config.recon_preset, config.fsc_scope, config.tiar, config.temporal_cache) == ("auto", "none", True, False)
    assert config.output_correction and QDiffusionConfig().recon_preset == "fast"
    assert (config.act_samples_per_step, config.batch_size) == (16, 64)
    assert RTNConfig().fsc_scope == QDiffusionConfig().fsc_scope == "none"
    assert TFMQConfig(a_bits=None).fsc_scope == "none"  # FSC calibrates activations: nothing to do without them
    assert TFMQConfig() == TFMQConfig(recon_preset="auto", fsc_scope="none", output_correction=True)
    assert TFMQConfig(recon_preset="fast") == TFMQConfig(recon_preset="fast", fsc_scope="temporal")


@pytest.mark.parametrize("config", [
    RTNConfig(w_bits=None, a_bits=16, act_init="minmax", quantize_attention=False, softmax_bits=6,
              split_shortcut=False, output_correction=True, output_correction_samples=8, layers=(LayerRule.full_precision("conv_in"), LayerRule("up_blocks.*", w_bits=8))),
    QDiffusionConfig(recon_preset="balanced", recon_batch_size=4, memory_budget_mb=0.5, fsc_scope="all"),
    TFMQConfig(tiar=False, temporal_cache=True, temporal_selection=True, fsc_scope="all", fsc_momentum=None),
], ids=["rtn", "qdiff", "tfmq"])
def test_round_trips_through_json_to_its_own_type(config: QuantConfig) -> None:
    restored = _round_trip(config)
    assert restored == config and type(restored) is type(config)
    assert config.to_dict()["method"] == config.method
    hash(restored)


def test_missing_keys_take_the_types_defaults() -> None:
    assert QuantConfig.from_dict({"method": "qdiff", "w_bits": 8}) == QDiffusionConfig(w_bits=8)


def test_layer_rules_from_json_become_a_hashable_tuple() -> None:
    config = RTNConfig(layers=[{"pattern": "conv_in", "w_bits": None, "a_bits": None}])
    assert config.layers == (LayerRule.full_precision("conv_in"),)
    hash(config)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("w_bits", 1), ("w_bits", 9), ("w_bits", True), ("w_bits", 4.0), ("w_bits", "4"),
        ("a_bits", 3), ("a_bits", 17), ("softmax_bits", 1), ("softmax_bits", 32),
        ("weight_init", "percentile"), ("act_init", "max"), ("quantize_attention", 1), ("split_shortcut", "yes"),
        ("layers", "conv_in"), ("layers", (3,)), ("act_samples_per_step", 0), ("batch_size", 1.5),
        ("tiar", 0), ("temporal_cache", "yes"), ("temporal_selection", None),
        ("tiar_weight_iters", -1), ("tiar_batch_size", 0), ("tiar_weight_lr", 0.0), ("tiar_weight_lr", "fast"),
        ("output_correction", 1), ("output_correction_samples", 0), ("output_correction_samples", 2.0),
    ],
)
def test_rejects_bad_value_naming_it(field: str, value: object) -> None:
    with pytest.raises(TfmqError, match=field) as error:  # the error the CLI turns into one line and exit code 2
        TFMQConfig(**{field: value})
    assert repr(value) in str(error.value)
    assert isinstance(error.value, ValueError)  # callers catching ValueError keep working


def test_a_field_of_another_method_is_one_line_naming_the_field_and_its_method() -> None:
    with pytest.raises(TfmqError, match=r"^tiar is a setting of method tfmq, not of 'rtn' \(RTNConfig\)$"):
        config_for("rtn", {"tiar": False})
    with pytest.raises(TfmqError, match=r"^recon_preset is a setting of method qdiff, tfmq, not of 'rtn'"):
        QuantConfig.from_dict({"method": "rtn", "recon_preset": "fast"})
    with pytest.raises(TfmqError, match="bits_w is not a setting of any method"):
        QuantConfig.from_dict({"method": "tfmq", "bits_w": 4})
    with pytest.raises(TfmqError, match="method must be one of rtn, qdiff, tfmq"):
        QuantConfig.from_dict({"w_bits": 4})
    with pytest.raises(TypeError, match="tiar"):  # Python's own error for a wrong keyword names it too
        RTNConfig(tiar=False)  # type: ignore[call-arg]


def test_is_frozen() -> None:
    with pytest.raises(AttributeError):
        RTNConfig().w_bits = 8  # type: ignore[misc]


def test_temporal_selection_needs_the_cache() -> None:
    with pytest.raises(TfmqError, match="temporal_selection=True .* needs temporal_cache=True"):
        TFMQConfig(temporal_selection=True)
    assert RTNConfig(fsc_scope="temporal").fsc_scope == "temporal"  # FSC is calibration: every method may use it
    with pytest.raises(TfmqError, match="a_bits is None"):
        RTNConfig(a_bits=None, fsc_scope="temporal")


def test_presets_give_their_lengths_and_fields_override_them() -> None:
    lengths = {name: TFMQConfig(recon_preset=name).reconstruction.weight_iters for name in ("fast", "balanced", "paper")}
    assert lengths == {"fast": 200, "balanced": 2_000, "paper": 20_000}
    balanced = QDiffusionConfig(recon_preset="balanced", recon_weight_iters=7).reconstruction
    assert balanced.weight_iters == 7 and balanced.weight_lr == 1e-2 and balanced.act_iters == 50
    # FSC over every activation replaces the step sizes LSQ would learn: no LSQ step runs
    assert QDiffusionConfig(fsc_scope="all", recon_act_iters=9).reconstruction.act_iters == 0


def test_tiar_takes_the_blocks_settings_unless_its_own_fields_are_set() -> None:
    fast = TFMQConfig(recon_preset="fast", recon_weight_iters=30)
    assert fast.tiar_reconstruction == fast.reconstruction
    mine = TFMQConfig(recon_preset="auto", recon_act_iters=3, tiar_weight_iters=7, tiar_batch_size=1024,
                      tiar_weight_lr=0.5)
    assert mine.tiar_reconstruction == dataclasses.replace(mine.reconstruction, weight_iters=7, batch_size=1024,
                                                           weight_lr=0.5)
    assert mine.tiar_reconstruction.act_iters == 3  # the fields it has no own value for follow the blocks'
    assert mine.reconstruction == TFMQConfig(recon_preset="auto", recon_act_iters=3).reconstruction
    assert _round_trip(mine) == mine


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("conv_in", "conv_in", True), ("conv_in", "conv_in_extra", False), ("up_blocks.1", "up_blocks.1.resnets.0.conv1", True),
    ("*.time_emb_proj", "down_blocks.0.resnets.1.time_emb_proj", True), ("up_blocks.1", "up_blocks.10.conv", False),
    (r"re:down_blocks\.\d+\.resnets\.0", "down_blocks.3.resnets.0.conv2", True),
    (r"re:down_blocks\.\d+\.resnets\.0", "down_blocks.3.resnets.10.conv2", False),
])
def test_a_rule_matches_a_layer_or_its_parents_by_glob_or_regex(pattern: str, name: str, matches: bool) -> None:
    assert LayerRule(pattern).matches(name) is matches


def test_later_rules_override_earlier_ones_field_by_field() -> None:
    config = RTNConfig(w_bits=4, a_bits=8, layers=(LayerRule("mid_block", w_bits=8), LayerRule("mid_block.attn*", a_bits=16),
                                                   LayerRule.full_precision("conv_out")))
    assert config.layer_bits("mid_block.attentions.0.to_q") == config.layer_bits("mid_block.resnets.0.conv1")
    assert (config.layer_bits("mid_block.attn1").w_bits, config.layer_bits("mid_block.attn1").a_bits) == (8, 16)
    assert config.layer_bits("down_blocks.0.conv").full_precision is False
    assert config.layer_bits("conv_out").full_precision is True
    weights_only = RTNConfig(a_bits=None, layers=(LayerRule("conv_in", w_bits=None),))
    assert weights_only.layer_bits("conv_in").full_precision is True  # both end up None
    assert RTNConfig(w_bits=None, a_bits=None).layer_bits("conv1").full_precision is False  # no rule: still wrapped


@pytest.mark.parametrize(("rule", "problem"), [
    (dict(pattern=""), "non-empty"), (dict(pattern="re:("), "not a regular expression"),
    (dict(pattern="x", w_bits=1), "w_bits"), (dict(pattern="x", a_bits="8"), "a_bits"),
])
def test_bad_layer_rules_are_refused_naming_the_problem(rule: dict, problem: str) -> None:
    with pytest.raises(TfmqError, match=problem):
        LayerRule(**rule)


def test_a_method_name_is_taken_once() -> None:
    with pytest.raises(TfmqError, match="already the name of RTNConfig"):
        type("Other", (QuantConfig,), {}, method="rtn")


def test_the_auto_preset_brings_tfmq_its_tiar_settings_and_the_output_correction_without_fsc() -> None:
    auto = TFMQConfig(recon_preset="auto")
    assert auto.output_correction and auto.output_correction_samples == 8
    assert auto.fsc_scope == "none" and TFMQConfig(recon_preset="auto", fsc_scope="temporal").fsc_scope == "temporal"
    assert TFMQConfig(recon_preset="balanced").fsc_scope == "temporal"
    tiar, blocks = auto.tiar_reconstruction, auto.reconstruction
    assert (tiar.batch_size, tiar.weight_lr, tiar.weight_iters) == (128, 0.1, 300)
    assert (blocks.batch_size, blocks.weight_lr, blocks.weight_iters) == (16, 0.1, 1_200)
    explicit = TFMQConfig(recon_preset="auto", tiar_weight_lr=0.02, output_correction=False)
    assert explicit.tiar_reconstruction.weight_lr == 0.02 and explicit.tiar_reconstruction.batch_size == 128
    assert not explicit.output_correction
    # other presets and methods: off, TIAR as the blocks; the resolved value is what the JSON keeps
    assert not TFMQConfig(recon_preset="balanced").output_correction
    assert TFMQConfig(recon_preset="balanced").tiar_reconstruction == TFMQConfig(recon_preset="balanced").reconstruction
    assert not QDiffusionConfig(recon_preset="auto").output_correction
    assert TFMQConfig.from_dict(auto.to_dict()) == auto and auto.to_dict()["output_correction"] is True
