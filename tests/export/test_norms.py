from __future__ import annotations

import collections

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from tfmq.export.norms import ChannelMomentsGroupNorm, GroupNormThenAffine, replace_group_norms


def affine_group_norm(channels: int = 8) -> nn.GroupNorm:
    norm = nn.GroupNorm(4, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels))
        norm.bias.copy_(torch.randn(channels))
    return norm


@pytest.mark.parametrize("form", [GroupNormThenAffine, ChannelMomentsGroupNorm])
@pytest.mark.parametrize("shape", [(3, 8, 5, 5), (3, 8, 7), (3, 8)])
def test_each_form_is_the_group_norm(form, shape) -> None:
    torch.manual_seed(0)
    norm = affine_group_norm()
    inputs = torch.randn(*shape) * 3 + 1
    torch.testing.assert_close(form(norm)(inputs), norm(inputs))
    if len(shape) == 4:
        torch.testing.assert_close(form(norm)(inputs.contiguous(memory_format=torch.channels_last)), norm(inputs))


@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_channel_moments_keep_their_precision_far_from_zero(offset) -> None:
    # moments about zero would lose most of the variance to cancellation here
    torch.manual_seed(0)
    norm = affine_group_norm()
    inputs = torch.randn(3, 8, 16, 16) + offset + torch.arange(8.0)[None, :, None, None]
    errors = (ChannelMomentsGroupNorm(norm)(inputs) - norm(inputs)).abs().max()
    assert errors < offset * 1e-6  # float32's own resolution of the inputs, normalised
    with pytest.raises(ValueError, match="takes an affine GroupNorm"):
        ChannelMomentsGroupNorm(nn.GroupNorm(2, 8, affine=False))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_the_affine_exports_as_one_batch_normalization(tmp_path) -> None:
    torch.manual_seed(0)
    norm = affine_group_norm()
    inputs = torch.randn(2, 8, 4, 4)
    path = tmp_path / "norm.onnx"
    torch.onnx.export(GroupNormThenAffine(norm), (inputs,), str(path), input_names=["x"], opset_version=17,
                      dynamo=False)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["BatchNormalization"] == 1 and ops["Mul"] == ops["Add"] == 0  # the exporter's x*1+0 folded away
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": inputs.numpy()})[0]), norm(inputs))


def test_every_affine_group_norm_is_replaced_and_others_are_left() -> None:
    model = nn.Sequential(affine_group_norm(), nn.Sequential(nn.GroupNorm(2, 8, affine=False), affine_group_norm()))
    assert replace_group_norms(model, GroupNormThenAffine) == 2
    assert [type(module).__name__ for module in (model[0], model[1][0], model[1][1])] == [
        "GroupNormThenAffine", "GroupNorm", "GroupNormThenAffine"]
    with pytest.raises(ValueError, match="without affine"):
        GroupNormThenAffine(nn.GroupNorm(2, 8, affine=False))
