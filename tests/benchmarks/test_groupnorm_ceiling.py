"""benchmarks/groupnorm_ceiling.py cuts every GroupNorm (and its SiLU) out of an exported graph, which still loads."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from tests.quant.tiny_unets import pixel_unet
from tfmq.export import OnnxUNet, export_onnx, trajectory_inputs
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import RTNConfig
from tfmq.sampling import SamplerConfig, sampling_timesteps

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import groupnorm_ceiling  # noqa: E402  (a script folder, not a package)

SAMPLER = SamplerConfig(steps=4)


@pytest.fixture(scope="module")
def graph_and_norms(tmp_path_factory) -> tuple[Path, int, int]:
    """A tiny W8A8 graph, its GroupNorms, and how many of them a SiLU follows (all but the attentions')."""
    scheduler = fashion_ddpm_scheduler()
    unet = pixel_unet()
    calibration = collect_calibration(unet, scheduler, 4, SAMPLER, 2, progress=False)
    quantized = quantize(unet, RTNConfig(w_bits=8, a_bits=8, weight_init="symmetric"), calibration, progress=False)
    path = export_onnx(quantized, tmp_path_factory.mktemp("ceiling") / "w8a8.onnx",
                       schedule=sampling_timesteps(scheduler, SAMPLER).tolist(),
                       calibration=trajectory_inputs(quantized, scheduler, SAMPLER, num_images=2))
    norms = sum(isinstance(module, nn.GroupNorm) for module in unet.modules())
    silu_norms = sum(isinstance(module, nn.GroupNorm) for name, module in unet.named_modules()
                     if "attentions" not in name)
    return path, norms, silu_norms


def _cut(path: Path, one_pass: bool, tmp_path: Path) -> tuple[Path, int, collections.Counter]:
    model = onnx.load(str(path))
    cut = groupnorm_ceiling.without_group_norms(model, one_pass)
    onnx.save(model, str(tmp_path / "cut.onnx"))
    return tmp_path / "cut.onnx", cut, collections.Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("one_pass", [False, True])
def test_every_norm_and_its_silu_is_cut_and_the_graph_still_loads(graph_and_norms, one_pass, tmp_path) -> None:
    path, norms, silu_norms = graph_and_norms
    before = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    cut_path, cut, after = _cut(path, one_pass, tmp_path)
    assert cut == norms == before["InstanceNormalization"] and after["InstanceNormalization"] == 0
    assert after["BatchNormalization"] == (norms if one_pass else 0)
    assert before["Sigmoid"] - after["Sigmoid"] == silu_norms < norms  # each SiLU after a norm went with it
    inputs = {"sample": torch.randn(2, 3, 8, 8), "timestep": torch.full((2,), 800)}
    original, variant = OnnxUNet(path, threads=1)(**inputs).sample, OnnxUNet(cut_path, threads=1)(**inputs).sample
    assert variant.shape == original.shape and torch.isfinite(variant).all()
    assert not torch.allclose(variant, original, atol=1e-3)  # the norms did something: the values are wrong
