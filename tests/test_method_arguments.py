"""The flags of `tfmq quantize` that make its config: only the flags given reach it."""

from __future__ import annotations

import pytest

from tfmq.cli import build_parser
from tfmq.errors import TfmqError
from tfmq.method_arguments import config_from_arguments
from tfmq.quant.config import LayerRule, QDiffusionConfig, RTNConfig, TFMQConfig


def _config(*flags: str):
    return config_from_arguments(build_parser().parse_args(["quantize", "--out", "q", *flags]))


def test_no_flags_give_the_config_types_defaults() -> None:
    assert _config() == RTNConfig()
    assert _config("--method", "qdiff") == QDiffusionConfig()
    assert _config("--method", "tfmq") == TFMQConfig()


def test_layer_rules_follow_the_default_rules_in_order() -> None:
    config = _config("--method", "tfmq", "--layer", "time_embedding=w8", "--layer", "*.time_emb_proj=W8A16",
                     "--layer", "re:mid_block\\..*=fp", "--layer", "conv_in=a8")
    assert config.layers[:-4] == TFMQConfig().layers
    assert config.layers[-4:] == (LayerRule("time_embedding", w_bits=8), LayerRule("*.time_emb_proj", w_bits=8, a_bits=16),
                                 LayerRule.full_precision("re:mid_block\\..*"), LayerRule("conv_in", a_bits=8))
    assert config.layer_bits("conv_in").a_bits == 8 and config.layer_bits("conv_in").w_bits is None


def test_method_flags_set_their_fields_and_refuse_another_methods() -> None:
    config = _config("--method", "tfmq", "--no-tiar", "--temporal-cache", "--preset", "balanced", "--a-bits", "none")
    assert (config.tiar, config.temporal_cache, config.recon_preset, config.a_bits, config.fsc_scope) == (
        False, True, "balanced", None, "none")
    with pytest.raises(TfmqError, match="^--no-tiar applies to method tfmq, not qdiff$"):
        _config("--method", "qdiff", "--no-tiar")


def test_the_output_correction_flags_reach_every_method_and_its_sample_count_needs_the_correction() -> None:
    config = _config("--method", "qdiff", "--output-correction", "--output-correction-samples", "8")
    assert (config.output_correction, config.output_correction_samples) == (True, 8)
    assert not _config().output_correction and not _config("--method", "tfmq", "--preset", "fast").output_correction
    assert _config("--method", "tfmq", "--output-correction-samples", "4").output_correction  # auto, tfmq's default
    assert not _config("--method", "tfmq", "--preset", "auto", "--no-output-correction").output_correction
    with pytest.raises(TfmqError, match="give --output-correction too"):
        _config("--output-correction-samples", "16")
