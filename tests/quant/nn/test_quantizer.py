from __future__ import annotations

import pytest
import torch

from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.nn.quantizer import MSE_ERROR_POWER, OBSERVED_SAMPLE_SIZE


def heavy_tailed_weight(channels: int = 16, fan_in: int = 288, seed: int = 0) -> torch.Tensor:
    """Student-t (3 dof) weights with a different magnitude per output channel, like trained convs."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(channels, fan_in, generator=generator)
    chi2 = torch.randn(channels, fan_in, 3, generator=generator).pow(2).sum(-1)
    student_t = normal / (chi2 / 3).sqrt()
    magnitudes = torch.logspace(-2, 0, channels)[:, None]
    return (student_t * magnitudes).reshape(channels, 32, 3, 3)


def initialised(bits: int | None, values: torch.Tensor, *, channels: int | None = None, init: str = "minmax"):
    quantizer = UniformQuantizer(bits, channels=channels, init=init)
    quantizer.init_range(values)
    return quantizer


def test_outputs_lie_on_the_grid_within_its_range() -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    quantizer = initialised(4, values)
    codes = quantizer(values) / quantizer.scale + quantizer.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -1e-4 and codes.max() <= 15 + 1e-4
    assert quantizer.zero_point == quantizer.zero_point.round()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_at_most_two_to_the_bits_levels(bits: int) -> None:
    values = torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 3 - 1
    levels = initialised(bits, values)(values).unique()
    assert len(levels) <= 2**bits
    assert len(levels) >= 2**bits - 1  # dense uniform data fills the grid


def test_zero_is_represented_exactly() -> None:
    values = torch.tensor([0.3, 1.7, 2.9, 0.0])
    assert initialised(3, values)(values)[3] == 0.0


def test_per_channel_scales_follow_each_channel() -> None:
    weight = heavy_tailed_weight()
    quantizer = initialised(4, weight, channels=16)
    channel_ranges = weight.flatten(1).amax(1) - weight.flatten(1).amin(1)
    assert torch.allclose(quantizer.scale.detach(), channel_ranges / 15, rtol=1e-5)
    assert len(quantizer.scale.unique()) == 16
    # The smallest channel (100x below the largest) keeps a grid of its own; a per-tensor grid zeroes it.
    assert quantizer(weight)[0].unique().numel() >= 8
    assert initialised(4, weight)(weight)[0].unique().tolist() == [0.0]


@pytest.mark.parametrize("bits", [3, 4])
def test_mse_init_beats_minmax_on_heavy_tails(bits: int) -> None:
    weight = heavy_tailed_weight()
    errors = {}
    for init in ("minmax", "mse"):
        quantizer = initialised(bits, weight, channels=16, init=init)
        errors[init] = (quantizer(weight) - weight).abs().pow(MSE_ERROR_POWER).flatten(1).mean(1)
    assert torch.all(errors["mse"] <= errors["minmax"] + 1e-12)  # per channel, never worse
    assert errors["mse"].sum() < 0.9 * errors["minmax"].sum()  # and clipping the tails pays


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_init_centres_the_grid_on_zero(bits: int) -> None:
    weight = heavy_tailed_weight() + 0.05  # skewed: an asymmetric grid would move its zero point
    quantizer = initialised(bits, weight, channels=16, init="symmetric")
    half = 2 ** (bits - 1)
    assert torch.equal(quantizer.zero_point, torch.full((16,), float(half)))
    centred = quantizer.integer_values(weight) - quantizer.zero_point.view(-1, 1, 1, 1)
    assert centred.min() >= -half and centred.max() <= half - 1  # signed integers of `bits` bits
    # the MSE search still clips the tails: some channel's grid ends inside its largest |w|
    largest = weight.flatten(1).abs().amax(1)
    assert bool((quantizer.scale.detach() * (half - 1) < 0.99 * largest).any())
    asymmetric = initialised(bits, weight, channels=16, init="mse")
    assert not torch.equal(asymmetric.zero_point, quantizer.zero_point)


def test_gradient_passes_straight_through_inside_the_range() -> None:
    quantizer = initialised(4, torch.tensor([-1.0, 1.0]))
    values = torch.tensor([-2.0, -0.73, 0.0, 0.41, 0.99, 3.0], requires_grad=True)
    quantizer(values).sum().backward()
    assert values.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_scale_gradient_is_the_lsq_gradient() -> None:
    quantizer = initialised(4, torch.tensor([-1.0, 1.0]))
    scale, zero_point = quantizer.scale.item(), quantizer.zero_point.item()
    inside, above = torch.tensor([0.41]), torch.tensor([3.0])
    quantizer(inside).sum().backward()
    # d x^ / d s = round(x/s) - x/s inside the range (LSQ), q_max - z where clipped above.
    expected_inside = round(0.41 / scale) - 0.41 / scale
    assert quantizer.scale.grad.item() == pytest.approx(expected_inside, abs=1e-5)
    quantizer.scale.grad = None
    quantizer(above).sum().backward()
    assert quantizer.scale.grad.item() == pytest.approx(15 - zero_point, abs=1e-5)


@pytest.mark.parametrize("channels", [None, 16])
def test_the_no_gradient_path_gives_the_values_of_the_gradient_path(channels: int | None) -> None:
    weight = heavy_tailed_weight()
    quantizer = initialised(4, weight, channels=channels)
    with torch.no_grad():
        without = quantizer(weight)
    with_gradient = quantizer(weight.clone().requires_grad_(True))
    assert with_gradient.requires_grad and not without.requires_grad
    assert torch.equal(without, with_gradient.detach())
    assert len(without.unique()) > 2  # a real grid, not a constant


def test_identity_when_full_precision_or_disabled() -> None:
    values = torch.randn(100)
    assert torch.equal(UniformQuantizer(None)(values), values)
    quantizer = initialised(2, values)
    quantizer.enabled = False
    assert torch.equal(quantizer(values), values)


def test_uncalibrated_quantizer_refuses_to_run() -> None:
    with pytest.raises(RuntimeError, match="no range"):
        UniformQuantizer(8)(torch.randn(4))


def test_observation_spans_all_batches_and_passes_values_through() -> None:
    quantizer = UniformQuantizer(8, init="minmax")
    quantizer.start_observing()
    first, second = torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 1.55])
    assert torch.equal(quantizer(first), first)
    quantizer(second)
    quantizer.finalize_range()
    assert not quantizer.observing
    # Range [-1, 1.55] over 255 steps: s = 0.01, z = 100, both ends on the grid.
    assert quantizer.scale.item() == pytest.approx(0.01)
    assert quantizer.zero_point.item() == 100
    assert quantizer(torch.tensor([-1.0, 1.55])).tolist() == pytest.approx([-1.0, 1.55], abs=1e-6)


def test_mse_calibration_over_batches_equals_init_on_all_values_when_they_fit_the_sample() -> None:
    torch.manual_seed(2)
    batches = [torch.distributions.Laplace(0.0, 1.0 + i).sample((2000,)) for i in range(4)]
    observed = UniformQuantizer(4, init="mse")
    observed.start_observing()
    for batch in batches:
        observed(batch)
    observed.finalize_range()
    whole = initialised(4, torch.cat(batches), init="mse")
    assert torch.allclose(observed.scale, whole.scale) and torch.equal(observed.zero_point, whole.zero_point)
    # MSE clips a Laplace tail: a smaller range than min-max
    assert observed.scale < initialised(4, torch.cat(batches)).scale


def test_observed_sample_is_bounded_and_drawn_from_every_batch() -> None:
    quantizer = UniformQuantizer(8)
    quantizer.start_observing()
    for offset in range(4):
        quantizer(torch.full((OBSERVED_SAMPLE_SIZE,), float(offset)))
    kept = quantizer._observation.values
    assert kept.numel() == OBSERVED_SAMPLE_SIZE
    shares = torch.bincount(kept.long(), minlength=4) / OBSERVED_SAMPLE_SIZE
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.02)


def test_observed_sample_is_the_bottom_k_by_key_of_everything_seen() -> None:
    batches = [torch.randn(size, generator=torch.Generator().manual_seed(size)) for size in (40_000, 50_000, 300_000, 7)]
    quantizer = UniformQuantizer(8)
    quantizer.start_observing()
    for batch in batches:
        quantizer(batch)
    generator = torch.Generator().manual_seed(0)  # the keys the observation drew, batch by batch
    keys = torch.cat([torch.rand(len(batch), generator=generator) for batch in batches])
    expected = torch.cat(batches)[torch.topk(keys, OBSERVED_SAMPLE_SIZE, largest=False).indices]
    # as sets (float32 keys tie now and then, and tied keys may come in either order), in the keys' order
    sample = quantizer._observation.sample()
    assert torch.equal(sample.sort().values, expected.sort().values)
    assert torch.equal(sample[:1000], expected[:1000]) or bool((keys.sort().values[:1000].diff() == 0).any())


def test_cancelled_observation_leaves_the_quantizer_uncalibrated() -> None:
    quantizer = UniformQuantizer(8)
    quantizer.start_observing()
    quantizer(torch.randn(10))
    quantizer.cancel_observing()
    assert not quantizer.observing and not quantizer.initialized


def test_integer_values_are_the_codes_of_the_fake_quantized_output() -> None:
    weight = heavy_tailed_weight()
    quantizer = initialised(4, weight, channels=16, init="mse")
    codes = quantizer.integer_values(weight)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    zero_point, scale = quantizer.zero_point.view(-1, 1, 1, 1), quantizer.scale.view(-1, 1, 1, 1)
    assert torch.equal((codes.float() - zero_point) * scale, quantizer(weight))


def test_integer_values_need_at_most_8_bits() -> None:
    with pytest.raises(ValueError, match="8 bits"):
        initialised(16, torch.randn(10)).integer_values(torch.randn(10))


def test_fresh_quantizer_loads_a_saved_state_exactly() -> None:
    weight = heavy_tailed_weight()
    saved = initialised(3, weight, channels=16, init="mse")
    fresh = UniformQuantizer(3, channels=16)
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(fresh(weight), saved(weight))


@pytest.mark.parametrize("bits", [1, 17, True, 4.5])
def test_rejects_bad_bit_widths(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        UniformQuantizer(bits)  # type: ignore[arg-type]
