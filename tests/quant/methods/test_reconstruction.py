from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from tests.quant.methods.helpers import calibrated, input_batches
from tests.quant.tiny_unets import pixel_unet
from tfmq.quant.config import QDiffusionConfig, QuantConfig, RTNConfig, TFMQConfig
from tfmq.quant.reconstruction_settings import ReconstructionSettings, RoundingStop
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.wrap import set_quant_state
from tfmq.quant.methods.capture import Call, capture
from tfmq.quant.methods.reconstruction import reconstruct, reconstruction_loss
from tfmq.quant.methods.units import ReconstructionUnit, unet_units

UNet = UNet2DModel | UNet2DConditionModel
W4A8 = QDiffusionConfig(w_bits=4, a_bits=8, recon_preset="paper")

PIXEL_UNITS = [
    "time_embedding.linear_1", "time_embedding.linear_2",
    "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", "down_blocks.1.resnets.0",
    "down_blocks.1.attentions.0",
    "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
    "up_blocks.0.resnets.0", "up_blocks.0.attentions.0", "up_blocks.0.resnets.1", "up_blocks.0.attentions.1",
    "up_blocks.0.upsamplers.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1",
]


def settings(**overrides: object) -> ReconstructionSettings:
    values = dict(weight_iters=30, act_iters=10, batch_size=8, weight_lr=1e-2, act_lr=4e-5, memory_budget_mb=64.0)
    return ReconstructionSettings(**{**values, **overrides})


def test_units_of_a_unet_are_its_blocks_in_forward_order() -> None:
    full_precision = pixel_unet()
    model = calibrated(full_precision, W4A8, input_batches(full_precision, 1, 2, seed=0))
    units = unet_units(model, full_precision, input_batches(full_precision, 1, 2, seed=0)[0])
    # Registration order would put mid_block.attentions.0 before mid_block.resnets.0.
    assert [unit.name for unit in units] == PIXEL_UNITS
    resnet = units[PIXEL_UNITS.index("mid_block.resnets.0")]
    assert resnet.inputs_from == (model.mid_block.resnets[0],)
    assert resnet.targets_from == (full_precision.mid_block.resnets[0],)
    # The temporal path is learnt with its block.
    assert model.mid_block.resnets[0].time_emb_proj in resnet.layers
    assert model.mid_block.resnets[0].time_emb_proj.input_quantizer in resnet.activation_quantizers
    assert all(layer.weight_quantizer not in resnet.activation_quantizers for layer in resnet.layers)


def test_quantized_first_and_last_layers_become_units_of_their_own(unet: UNet) -> None:
    batches = input_batches(unet, 1, 2, seed=0)
    model = calibrated(unet, RTNConfig(layers=()), batches)
    names = [unit.name for unit in unet_units(model, unet, batches[0])]
    assert names[-1] == "conv_out" and "conv_in" in names
    blocks = [model.get_submodule(name) for name in names]
    assert any(isinstance(block, Transformer2DModel) for block in blocks) == isinstance(unet, UNet2DConditionModel)
    assert sum(isinstance(block, ResnetBlock2D) for block in blocks) == 8
    # Outermost blocks only: no unit lies inside another.
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)


def test_capture_replays_each_unit_to_its_full_precision_output(unet: UNet) -> None:
    batches = input_batches(unet, 2, 3, seed=0)
    model = calibrated(unet, W4A8, batches)
    set_quant_state(model, weight=False, act=False)  # the quantized twin now computes what the original does
    for unit in unet_units(model, unet, batches[0]):
        cache, templates = capture(unit, model, unet, batches, budget_bytes=1e9)
        with cache:
            rows = cache.rows(torch.arange(6))
            calls = [template.filled(rows) for template in templates]
            output = unit.forward(*calls)
            output = output[0] if isinstance(output, tuple) else output
            assert torch.allclose(output, rows["target0"], atol=1e-5), unit.name
            if isinstance(unit.inputs_from[0], ResnetBlock2D):
                assert rows["input0.arg1"].shape == (6, 32)  # temb, one row per sample
            if isinstance(unit.inputs_from[0], Transformer2DModel):
                assert rows["input0.encoder_hidden_states"].shape == (6, 3, 8)
                assert templates[0].kwargs["return_dict"] is False  # a static argument, kept as it was


def test_a_budget_too_small_for_memory_caches_on_disk_with_the_same_result(tmp_path, capsys) -> None:
    full_precision = pixel_unet()
    batches = input_batches(full_precision, 2, 8, seed=0)
    reference = calibrated(full_precision, W4A8, batches)
    fp_state = copy.deepcopy(full_precision.state_dict())
    models, results = [], []
    for budget in (64.0, 0.05):  # 0.05 MB: over one batch of every unit, under the third unit's whole cache
        model = copy.deepcopy(reference)
        units = unet_units(model, full_precision, batches[0])[:4]
        results.append(reconstruct(model, full_precision, units, batches, settings(memory_budget_mb=budget),
                                   progress=False, cache_dir=tmp_path))
        models.append(model)
    assert [r.on_disk for r in results[0]] == [False] * 4
    assert [r.on_disk for r in results[1]] == [False, False, True, False]
    assert [r.mse_after for r in results[0]] == [r.mse_after for r in results[1]]
    memory_state, disk_state = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(tensor, disk_state[name]) for name, tensor in memory_state.items())
    # Something was learnt: the rounding differs from the reference's round-to-nearest.
    assert not torch.equal(memory_state["down_blocks.0.resnets.0.conv1.weight"],
                           reference.state_dict()["down_blocks.0.resnets.0.conv1.weight"])
    assert not torch.equal(memory_state["down_blocks.0.resnets.0.conv2.input_quantizer.scale"],
                           reference.state_dict()["down_blocks.0.resnets.0.conv2.input_quantizer.scale"])
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == ""  # progress=False: no bars
    # The model keeps its modes and gradient flags; the original is untouched.
    assert all(p.requires_grad for p in models[0].parameters())
    assert [m.training for m in models[0].modules()] == [m.training for m in reference.modules()]
    assert all(torch.equal(tensor, fp_state[name]) for name, tensor in full_precision.state_dict().items())


def test_a_budget_below_one_batch_of_a_unit_is_refused_naming_the_unit(tmp_path) -> None:
    full_precision = pixel_unet()
    batches = input_batches(full_precision, 2, 8, seed=0)
    model = calibrated(full_precision, W4A8, batches)
    units = unet_units(model, full_precision, batches[0])[:4]
    with pytest.raises(ValueError, match=r"budget \(0.01 MB\) is too small for reconstruction unit "
                                         r"down_blocks.0.resnets.0: one batch of 8 of its samples takes 0.03 MB"):
        reconstruct(model, full_precision, units, batches, settings(memory_budget_mb=0.01), progress=False,
                    cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # its cache is gone


def test_a_unit_may_have_several_targets_and_inputs_from_elsewhere() -> None:
    """The shape of TFMQ's temporal information block: the time embedding MLP and every resnet's
    projection, learnt together against all the full-precision temporal features."""
    full_precision = pixel_unet()
    batches = input_batches(full_precision, 2, 16, seed=0)
    model = calibrated(full_precision, RTNConfig(w_bits=3, a_bits=8), batches)
    resnets = [name for name, module in model.named_modules() if isinstance(module, ResnetBlock2D)]
    projections = [model.get_submodule(f"{name}.time_emb_proj") for name in resnets]

    def temporal_features(call: Call) -> tuple[torch.Tensor, ...]:
        embedding = model.time_embedding(*call.args, **call.kwargs)
        return tuple(model.get_submodule(name).time_emb_proj(nn.functional.silu(embedding)) for name in resnets)

    layers = (model.time_embedding.linear_1, model.time_embedding.linear_2, *projections)
    unit = ReconstructionUnit(
        name="temporal_information_block",
        inputs_from=(model.time_embedding,),
        targets_from=tuple(full_precision.get_submodule(f"{name}.time_emb_proj") for name in resnets),
        forward=temporal_features,
        layers=layers,
        activation_quantizers=tuple(layer.input_quantizer for layer in layers),
    )
    (result,) = reconstruct(model, full_precision, [unit], batches, settings(weight_iters=60), progress=False)
    assert result.samples == 32
    assert result.mse_after < 0.8 * result.mse_before


def test_loss_sums_channels_and_averages_the_rest() -> None:
    output, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert reconstruction_loss([output], [target]).item() == 3.0
    assert reconstruction_loss([output, output[:, 0]], [target, target[:, 0]]).item() == 7.0
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss([output], [target[:1]])


def test_a_unit_the_forward_never_reaches_is_an_error() -> None:
    full_precision = pixel_unet()
    batches = input_batches(full_precision, 1, 2, seed=0)
    model = calibrated(full_precision, W4A8, batches)
    stray = nn.Linear(2, 2)
    unit = ReconstructionUnit("stray", (stray,), (stray,), stray, (), ())
    with pytest.raises(ValueError, match="before reaching"):
        reconstruct(model, full_precision, [unit], batches, settings(), progress=False)
    with pytest.raises(ValueError, match="inputs"):
        reconstruct(model, full_precision, [unit], [], settings(), progress=False)


def test_settings_come_from_the_preset_unless_given() -> None:
    paper = QDiffusionConfig(recon_preset="paper").reconstruction
    assert (paper.weight_iters, paper.act_iters, paper.batch_size) == (20_000, 5_000, 32)
    assert (paper.weight_lr, paper.act_lr) == (1e-3, 4e-5)
    fast = QDiffusionConfig(recon_preset="fast", recon_weight_iters=7, recon_act_lr=1e-4).reconstruction
    assert (fast.weight_iters, fast.act_iters, fast.act_lr) == (7, 50, 1e-4)
    config = QDiffusionConfig(recon_preset="fast", recon_batch_size=4, memory_budget_mb=0.5)
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_auto_is_balanced_with_fewer_cheaper_steps_and_the_levers_switch_on_any_preset() -> None:
    auto = QDiffusionConfig(recon_preset="auto").reconstruction
    balanced = QDiffusionConfig(recon_preset="balanced").reconstruction
    assert (auto.batch_size, auto.weight_iters) == (16, 1_300)
    assert dataclasses.replace(auto, batch_size=32, weight_iters=2_000) == balanced
    # tfmq's blocks take fewer steps at a higher rate under `auto` (its output correction is on), its own
    # explicit fields still win
    tfmq_auto = TFMQConfig(recon_preset="auto").reconstruction
    assert tfmq_auto == dataclasses.replace(auto, weight_iters=1_200, weight_lr=0.1)
    assert TFMQConfig(recon_preset="auto", recon_weight_iters=1_300, recon_weight_lr=0.01).reconstruction == auto
    assert TFMQConfig(recon_preset="balanced").reconstruction == balanced
    assert balanced.rounding_stop is None and balanced.rounding_start == "nearest"
    # The explicit fields switch either lever on or off whatever the preset; True is the early-ending rule.
    balanced = QDiffusionConfig(recon_preset="balanced", recon_rounding_stop=True, recon_rounding_start="gptq")
    assert balanced.reconstruction.rounding_stop == RoundingStop()
    assert balanced.reconstruction.rounding_start == "gptq"
    assert QDiffusionConfig(recon_preset="balanced", recon_rounding_stop=False).reconstruction.rounding_stop is None
    assert QuantConfig.from_dict(json.loads(json.dumps(balanced.to_dict()))) == balanced


def _reconstructed(rule: RoundingStop | None, **overrides: object) -> tuple[nn.Module, nn.Module, list]:
    """The first four units of a tiny W4A8 UNet reconstructed under `rule`, with the reference they started from."""
    full_precision = pixel_unet()
    batches = input_batches(full_precision, 2, 8, seed=0)
    reference = calibrated(full_precision, W4A8, batches)
    model = copy.deepcopy(reference)
    units = unet_units(model, full_precision, batches[0])[:4]
    values = dict(weight_iters=40, act_iters=0, rounding_stop=rule, **overrides)
    results = reconstruct(model, full_precision, units, batches, settings(**values), progress=False)
    return model, reference, results


def test_a_stopping_rule_ends_a_units_rounding_after_its_stale_checks() -> None:
    _, _, endless = _reconstructed(RoundingStop(check_every=5, patience=None))
    assert [result.rounding_steps for result in endless] == [40] * 4
    # No check lowers the best loss by 99 %: the second check (the first after step 0) is the last.
    _, _, strict = _reconstructed(RoundingStop(check_every=5, patience=1, tolerance=0.99, holdout_samples=4))
    assert [result.rounding_steps for result in strict] == [5] * 4


def test_a_stopping_rule_keeps_round_to_nearest_when_learning_only_makes_it_worse() -> None:
    # Adam at a learning rate of 10 flips decisions at random: every check is worse than step 0's
    # round-to-nearest, so the rule keeps it, bit for bit.
    model, reference, results = _reconstructed(RoundingStop(check_every=10, patience=2, holdout_samples=4),
                                               weight_lr=10.0)
    assert [result.rounding_steps for result in results] == [20] * 4
    nearest = _rounded_weights(reference)
    assert nearest and all(torch.equal(weight, nearest[name]) for name, weight in _rounded_weights(model).items())
    # Without the rule the same steps leave other decisions behind.
    unruled, _, _ = _reconstructed(None, weight_lr=10.0)
    assert any(not torch.equal(weight, nearest[name]) for name, weight in _rounded_weights(unruled).items())


@torch.no_grad()
def _rounded_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized weights of the layers in the first four units of `_reconstructed`."""
    return {name: module.weight_quantizer(module.weight) for name, module in model.named_modules()
            if isinstance(module, QuantLayer) and name.startswith(("time_embedding.", "down_blocks.0.resnets.0"))}


@pytest.mark.parametrize(
    ("field", "value"),
    [("recon_preset", "slow"), ("recon_weight_iters", -1), ("recon_act_iters", 2.0), ("recon_batch_size", 0),
     ("recon_weight_lr", 0.0), ("recon_act_lr", float("nan")), ("memory_budget_mb", -1), ("memory_budget_mb", True),
     ("recon_rounding_start", "best"), ("recon_rounding_stop", 1)],
)
def test_bad_reconstruction_settings_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        QDiffusionConfig(**{field: value})
