from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from tests.quant.nn.test_layers import relative_error
from tfmq.quant.nn.attention import QuantAttnProcessor, attention_probabilities


# Attention modules as diffusers builds them: UNet2DModel's spatial self-attention (4-D input,
# group norm, residual, output rescale, upcast softmax) and a transformer block's cross-attention.
def spatial_self_attention() -> Attention:
    return Attention(16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True,
                     upcast_softmax=True, rescale_output_factor=2.0, _from_deprecated_attn_block=True)


def cross_attention() -> Attention:
    return Attention(16, cross_attention_dim=8, heads=4, dim_head=4, upcast_attention=True)


ATTENTION_CASES = {
    "spatial_self": (spatial_self_attention, lambda g: {"hidden_states": torch.randn(2, 16, 4, 4, generator=g)}),
    "cross": (cross_attention, lambda g: {"hidden_states": torch.randn(2, 6, 16, generator=g),
                                          "encoder_hidden_states": torch.randn(2, 3, 8, generator=g)}),
    "cross_masked": (cross_attention, lambda g: {"hidden_states": torch.randn(2, 6, 16, generator=g),
                                                 "encoder_hidden_states": torch.randn(2, 3, 8, generator=g),
                                                 "attention_mask": torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, 0.0]])[:, None]}),
}


@pytest.fixture(params=sorted(ATTENTION_CASES))
def attention_case(request: pytest.FixtureRequest) -> tuple[Attention, dict[str, torch.Tensor]]:
    build, make_inputs = ATTENTION_CASES[request.param]
    torch.manual_seed(0)
    return build(), make_inputs(torch.Generator().manual_seed(1))


def run_with(attention: Attention, processor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    attention.set_processor(processor)
    return attention(**inputs)


def test_attention_processor_with_quantizers_off_reproduces_diffusers(attention_case) -> None:
    attention, inputs = attention_case
    assert isinstance(attention.processor, AttnProcessor2_0)
    scaled_dot_product = attention(**inputs)
    plain = run_with(attention, AttnProcessor(), inputs)
    quantizing = run_with(attention, QuantAttnProcessor(a_bits=None, probs_bits=None), inputs)
    assert torch.equal(quantizing, plain)  # same ops in the same order
    assert torch.allclose(quantizing, scaled_dot_product, atol=1e-5)


def test_attention_processor_fake_quantizes_the_matmul_inputs(attention_case) -> None:
    attention, inputs = attention_case
    reference = attention(**inputs)
    processor = QuantAttnProcessor(a_bits=8, probs_bits=4, act_init="minmax")
    attention.set_processor(processor)
    matmul_quantizers = [processor.query_quantizer, processor.key_quantizer, processor.probs_quantizer,
                         processor.value_quantizer]
    for quantizer in matmul_quantizers:
        quantizer.start_observing()
    attention(**inputs)
    for quantizer in matmul_quantizers:
        quantizer.finalize_range()
    assert all(bool(quantizer.initialized) for quantizer in matmul_quantizers)
    # The softmax output lies in [0, 1]: its 4-bit grid is at most 1/15 wide and starts at 0.
    assert processor.probs_quantizer.zero_point == 0 and processor.probs_quantizer.scale <= 1 / 15 + 1e-7
    quantized = attention(**inputs)
    assert 1e-3 < relative_error(quantized, reference) < 0.2
    processor.probs_quantizer.enabled = False
    assert relative_error(attention(**inputs), reference) < relative_error(quantized, reference)


def test_attention_probabilities_in_an_export_are_diffusers_scores(attention_case, monkeypatch) -> None:
    attention, inputs = attention_case
    head = attention.head_to_batch_dim
    query = head(torch.randn(2, 6, attention.inner_dim, generator=torch.Generator().manual_seed(2)))
    key = head(torch.randn(2, 3 if "encoder_hidden_states" in inputs else 6, attention.inner_dim))
    mask = inputs.get("attention_mask")
    if mask is not None:
        mask = attention.prepare_attention_mask(mask, key.shape[1], 2)
    diffusers_scores = attention.get_attention_scores(query, key, mask)
    assert torch.equal(attention_probabilities(attention, query, key, mask), diffusers_scores)  # the torch model
    # in an export: no baddbmm, whose zero input onnxruntime would fill and add
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    monkeypatch.setattr(torch, "baddbmm", None)
    torch.testing.assert_close(attention_probabilities(attention, query, key, mask), diffusers_scores)


def test_attention_quantizers_live_in_the_modules_state_dict() -> None:
    attention = spatial_self_attention()
    attention.set_processor(QuantAttnProcessor(a_bits=8, probs_bits=8))
    keys = set(attention.state_dict())
    for name in ("query", "key", "probs", "value"):
        assert {f"processor.{name}_quantizer.scale", f"processor.{name}_quantizer.zero_point"} <= keys


def test_attention_processor_reports_what_it_cannot_replace() -> None:
    attention = cross_attention()
    assert QuantAttnProcessor.unsupported_reason(attention) is None
    attention.set_processor(type("OtherProcessor", (), {})())
    assert "OtherProcessor" in QuantAttnProcessor.unsupported_reason(attention)
    assert "qk_norm" in QuantAttnProcessor.unsupported_reason(Attention(16, heads=2, dim_head=8, qk_norm="layer_norm"))
