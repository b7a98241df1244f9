"""Block reconstruction (BRECQ): one loop over units, shared by every method that reconstructs.

A unit names what to capture and what to learn: the modules of the quantized model whose call
arguments are its inputs, the modules of the full-precision model whose outputs are its targets, how
to replay the quantized unit from those inputs, and which layers (AdaRound) and activation quantizers
(LSQ step sizes) to train. For each unit in turn, `reconstruct`
1. runs the calibration data through the quantized model as it is so far (earlier units already
   reconstructed) and records the unit's inputs, and through the full-precision model for the targets;
2. learns the rounding of the unit's weights (AdaRound, its activation quantizers off), hardens it;
3. learns the step sizes of its activation quantizers (LSQ, cosine-decayed Adam);
each time minimising the squared error between the replayed unit's output and the target.

The units are `tfmq.quant.methods.units` (`unet_units` splits a diffusers UNet into BRECQ's), and step 1 is
`tfmq.quant.methods.capture`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tfmq import distributed
from tfmq.quant.reconstruction_settings import ReconstructionSettings, RoundingStop
from tfmq.quant.methods import gptq
from tfmq.quant.methods.adaround import AdaRoundQuantizer, RoundingRegularizer, adaptive_rounding, hard_rounding
from tfmq.quant.methods.capture import Call, ModelInputs, batch_size, capture, inputs_of_samples, output_tensors
from tfmq.quant.methods.unit_cache import UnitCache
from tfmq.quant.methods.resume import UnitCheckpoints
from tfmq.quant.methods.units import ReconstructionUnit
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.nn.quantizer import MIN_SCALE, UniformQuantizer

# The unit's error is reported (not trained) on this many of its cached samples, before and after.
REPORT_SAMPLES = 256


@dataclass(frozen=True)
class UnitResult:
    """How one unit went: mean squared error against the target (on up to REPORT_SAMPLES of its
    cached samples) before and after reconstruction, whether its cache went to disk, its time in all
    and capturing its data, and how many AdaRound steps it ran (fewer than set when a stopping rule ended them)."""

    name: str
    samples: int
    mse_before: float
    mse_after: float
    on_disk: bool
    seconds: float
    capture_seconds: float | None = None  # None: a checkpoint of an earlier version, which did not record it
    rounding_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Optimising a unit


def reconstruction_loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over batch and positions; summed over outputs.

    The scale of BRECQ's and AdaRound's loss, against which the rounding regulariser's weight 0.01 is set.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"the unit returned {len(outputs)} tensors for {len(targets)} targets")
    total = outputs[0].new_zeros(())
    for output, target in zip(outputs, targets):
        if output.shape != target.shape:
            raise ValueError(f"unit output of shape {tuple(output.shape)} against a target of {tuple(target.shape)}")
        error = (output.float() - target.float()).pow(2)  # a half-precision model's error in float32
        total = total + (error.sum(dim=1) if error.dim() > 1 else error).mean()
    return total


class _UnitData:
    """Random batches of a captured unit, and its output replayed from them.

    Batches are drawn from the first `total - holdout` samples by the same seeded generator on every rank (the
    last `holdout` are kept out of training); this rank's cache holds the samples `held` (all of them with one
    process) and it computes their share of each batch.
    """

    def __init__(self, unit: ReconstructionUnit, cache: UnitCache, templates: list[Call], seed: int,
                 total: int, held: range, holdout: int = 0) -> None:
        self.unit = unit
        self.cache = cache
        self.templates = templates
        self.target_keys = sorted((key for key in cache.keys if key.startswith("target")), key=lambda k: int(k[6:]))
        self.generator = torch.Generator().manual_seed(seed)
        self.total = total
        self.held = held
        self.training = total - holdout

    @property
    def held_out(self) -> range:
        """The samples kept out of training batches (all of them when none are)."""
        return range(self.training, self.total) if self.training < self.total else range(self.total)

    def random_indices(self, batch_size: int) -> torch.Tensor:
        return torch.randperm(self.training, generator=self.generator, device="cpu")[:batch_size]

    def loss(self, indices: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of the loss of the batch `indices`, None if it holds none of them: the shares
        of all ranks add up to the batch's loss, so their summed gradients are the batch's gradient."""
        local = indices[(indices >= self.held.start) & (indices < self.held.stop)] - self.held.start
        if len(local) == 0:
            return None
        rows = self.cache.rows(local)
        calls = [template.filled(rows) for template in self.templates]
        outputs = output_tensors(self.unit.forward(*calls))
        loss = reconstruction_loss(outputs, [rows[key] for key in self.target_keys])
        return loss if len(local) == len(indices) else loss * (len(local) / len(indices))

    def replay(self, samples: range, batch_size: int) -> Iterator[tuple[list[torch.Tensor], dict[str, torch.Tensor]]]:
        """The unit's outputs and cached rows, batch by batch, for this rank's share of `samples`."""
        first, stop = max(samples.start, self.held.start), min(samples.stop, self.held.stop)
        for start in range(first, stop, batch_size):
            rows = self.cache.rows(torch.arange(start, min(start + batch_size, stop), device="cpu") - self.held.start)
            calls = [template.filled(rows) for template in self.templates]
            yield output_tensors(self.unit.forward(*calls)), rows

    @torch.no_grad()
    def mse(self, batch_size: int, samples: range | None = None) -> float:
        """Mean squared error per element on `samples` (of all ranks; the first REPORT_SAMPLES by default)."""
        samples = range(min(self.total, REPORT_SAMPLES)) if samples is None else samples
        total, elements = 0.0, 0
        for outputs, rows in self.replay(samples, batch_size):
            for output, key in zip(outputs, self.target_keys):
                total += (output.float() - rows[key].float()).pow(2).sum().item()
                elements += output.numel()
        total, elements = distributed.sum_over_ranks(torch.tensor([total, elements], dtype=torch.float64, device="cpu")).tolist()
        return total / max(elements, 1)


def _sum(terms: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the terms that are there (None if none is)."""
    present = [term for term in terms if term is not None]
    return functools.reduce(operator.add, present) if present else None


def _adam(parameters: Sequence[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam in one fused kernel where the device has it (CPU and CUDA do): the step of a unit's many small
    rounding tensors costs a fraction of the per-tensor loop's."""
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.Adam(parameters, lr=lr)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor | None) -> None:
    """One optimizer step on the gradient of the whole batch: this rank's share of the loss (None: no
    sample of the batch here), its gradients summed over the ranks."""
    optimizer.zero_grad(set_to_none=True)
    if loss is not None:
        loss.backward()
    distributed.all_reduce_gradients(parameter for group in optimizer.param_groups for parameter in group["params"])
    optimizer.step()


def _batch_loss(share: torch.Tensor | None) -> float:
    """The loss of the whole batch from the ranks' shares (every rank calls it at the same iteration)."""
    value = torch.zeros((), dtype=torch.float64, device="cpu") if share is None else share.detach().double().cpu()
    return distributed.sum_over_ranks(value).item()


@contextmanager
def _activations_off(activation_quantizers: Sequence[UniformQuantizer]) -> Iterator[None]:
    states = [quantizer.enabled for quantizer in activation_quantizers]
    for quantizer in activation_quantizers:
        quantizer.enabled = False
    try:
        yield
    finally:
        for quantizer, state in zip(activation_quantizers, states):
            quantizer.enabled = state


class _BestRounding:
    """The hard decisions with the lowest held-out loss so far, and when a `RoundingStop` ends the steps."""

    def __init__(self, rule: RoundingStop, data: _UnitData, roundings: Sequence[AdaRoundQuantizer],
                 batch_size: int) -> None:
        self.rule = rule
        self.data = data
        self.roundings = roundings
        self.batch_size = batch_size
        self.best_loss = self.reference = math.inf
        self.best: list[torch.Tensor] = []
        self.stale_checks = 0
        self.check()

    def hard_loss(self) -> float:
        for quantizer in self.roundings:
            quantizer.soft = False
        try:
            return self.data.mse(self.batch_size, self.data.held_out)
        finally:
            for quantizer in self.roundings:
                quantizer.soft = True

    def check(self) -> bool:
        """Measure the current decisions, keep them if best; True once the rule says stop."""
        loss = self.hard_loss()  # the same on every rank: they all stop at the same step
        if loss < self.best_loss:
            self.best_loss = loss
            self.best = [quantizer.rounding.detach().clone() for quantizer in self.roundings]
        if loss < self.reference * (1 - self.rule.tolerance):
            self.reference, self.stale_checks = loss, 0
        else:
            self.stale_checks += 1
        return self.rule.patience is not None and self.stale_checks >= self.rule.patience

    def restore(self) -> None:
        with torch.no_grad():
            for quantizer, best in zip(self.roundings, self.best):
                quantizer.rounding.copy_(best)


# GPTQ's Hessians are gathered on this many training samples of the unit (every rank's share).
HESSIAN_SAMPLES = 256


@torch.no_grad()
def _gptq_starts(data: _UnitData, layers: Sequence[QuantLayer], batch_size: int) -> dict[QuantLayer, torch.Tensor]:
    """GPTQ's compensated weight of each layer (`tfmq.quant.methods.gptq`), from the inputs it gets when the unit
    is replayed as it is (activations unquantized, earlier layers rounded to nearest); {} when round-to-nearest
    has the lower loss on the held-out samples, so that the rounding never starts worse than it would have."""
    layers = [layer for layer in layers if layer.weight_quantizer.bits is not None and gptq.supports(layer)]
    if not layers:
        return {}
    samples = range(min(data.training, HESSIAN_SAMPLES))
    calls = math.ceil(len(samples) / batch_size)
    generator = torch.Generator().manual_seed(0)
    hessians = {layer: gptq.InputHessian(layer, math.ceil(gptq.MAX_ROWS / calls), generator) for layer in layers}
    handles = [layer.register_forward_pre_hook(lambda _, args, h=hessians[layer]: h.add(args[0])) for layer in layers]
    try:
        for _ in data.replay(samples, batch_size):
            pass
    finally:
        for handle in handles:
            handle.remove()
    starts = {}
    for layer, hessian in hessians.items():
        quantizer = layer.weight_quantizer
        starts[layer] = gptq.compensated_weight(layer.weight, distributed.sum_over_ranks(hessian.sum),
                                                quantizer.scale.detach().clamp_min(MIN_SCALE),
                                                quantizer.zero_point, 2**quantizer.bits - 1)
    nearest = data.mse(batch_size, data.held_out)
    with hard_rounding(layers, starts):
        compensated = data.mse(batch_size, data.held_out)
    return starts if compensated < nearest else {}


def _learn_rounding(data: _UnitData, settings: ReconstructionSettings, bar: tqdm) -> int:
    """AdaRound on the unit's layers with its activations unquantized, then hard rounding; the steps run.

    With `settings.rounding_start == "gptq"` the rounding starts from GPTQ's where that is better. With a stopping
    rule the regulariser's schedule spans `settings.weight_iters` wherever the steps end: what is kept are the
    hard decisions the rule measured best.
    """
    unit = data.unit
    if not any(layer.weight_quantizer.bits is not None for layer in unit.layers) or (
            settings.weight_iters == 0 and settings.rounding_start == "nearest"):
        return 0
    regularizer = RoundingRegularizer(settings.weight_iters)
    rule = settings.rounding_stop
    steps = 0
    with _activations_off(unit.activation_quantizers):
        starts = _gptq_starts(data, unit.layers, settings.batch_size) if settings.rounding_start == "gptq" else {}
        with adaptive_rounding(unit.layers, starts) as roundings:
            optimizer = _adam([rounding.rounding for rounding in roundings], settings.weight_lr)
            best = None if rule is None else _BestRounding(rule, data, roundings, settings.batch_size)
            for iteration in range(settings.weight_iters):
                reconstruction = data.loss(data.random_indices(settings.batch_size))
                # the regulariser counts once, on the main rank: the ranks' gradients are summed
                regularization = regularizer(roundings, iteration) if distributed.is_main() else None
                _step(optimizer, _sum([reconstruction, regularization]))
                steps += 1
                bar.update()
                if iteration % 50 == 0:
                    bar.set_postfix(phase="weights", loss=f"{_batch_loss(reconstruction):.3g}")
                if best is not None and steps % rule.check_every == 0 and best.check():
                    break
            if best is not None:
                if steps % rule.check_every:
                    best.check()
                best.restore()
    bar.update(settings.weight_iters - steps)
    return steps


def _learn_step_sizes(data: _UnitData, settings: ReconstructionSettings, bar: tqdm) -> None:
    """LSQ: Adam on the activation quantizers' step sizes, learning rate decayed on a cosine to 0."""
    steps = [quantizer.scale for quantizer in data.unit.activation_quantizers if quantizer.bits is not None]
    if settings.act_iters == 0 or not steps:
        return
    for step in steps:
        step.requires_grad_(True)
    try:
        optimizer = _adam(steps, settings.act_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.act_iters, eta_min=0.0)
        for iteration in range(settings.act_iters):
            loss = data.loss(data.random_indices(settings.batch_size))
            _step(optimizer, loss)
            schedule.step()
            bar.update()
            if iteration % 50 == 0:
                bar.set_postfix(phase="activations", loss=f"{_batch_loss(loss):.3g}")
    finally:
        for step in steps:
            step.requires_grad_(False)


def _check_batch_fits(unit: ReconstructionUnit, cache: UnitCache, batch: int, budget_mb: float) -> None:
    """Refuse a budget below one batch of the unit's data: that much is in memory whatever the cache does."""
    needed_mb = cache.sample_bytes * batch / 2**20
    if needed_mb > budget_mb:
        raise ValueError(f"the memory budget ({budget_mb:g} MB) is too small for reconstruction unit {unit.name}: "
                         f"one batch of {batch} of its samples takes {needed_mb:.2f} MB (raise --memory-budget-mb)")


@contextmanager
def _frozen(model: nn.Module, full_precision: nn.Module) -> Iterator[None]:
    """Both models in eval mode and without parameter gradients; restored afterwards."""
    models = (model, full_precision)
    modes = [[module.training for module in each.modules()] for each in models]
    grads = [[parameter.requires_grad for parameter in each.parameters()] for each in models]
    for each in models:
        each.eval()
        each.requires_grad_(False)
    try:
        yield
    finally:
        for each, each_modes, each_grads in zip(models, modes, grads):
            for module, mode in zip(each.modules(), each_modes):
                module.training = mode
            for parameter, grad in zip(each.parameters(), each_grads):
                parameter.requires_grad_(grad)


def reconstruct(
    model: nn.Module,
    full_precision: nn.Module,
    units: Sequence[ReconstructionUnit],
    inputs: Sequence[ModelInputs],
    settings: ReconstructionSettings,
    *,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    checkpoints: UnitCheckpoints | None = None,
) -> list[UnitResult]:
    """Reconstruct `units` of `model` in order against `full_precision`, over the model inputs `inputs`
    (keyword arguments of one forward each). Changes `model` in place: hardened weights, learnt step sizes.

    Batches are drawn with a generator seeded by `seed`, so a run is reproducible. Caches beyond
    `settings.memory_budget_mb` go to a temporary folder under `cache_dir` (the system's by default).

    With `checkpoints` each unit is checkpointed when done, and a unit an earlier run finished is loaded
    from its checkpoint instead of being reconstructed again (`tfmq.quant.methods.resume`).

    Under a process group every rank calls it with the same arguments; each captures and caches its shard
    of the samples (the budget is per rank), computes its share of every batch, and the gradients are summed
    before each step, so every rank learns the same parameters as one process, up to float rounding.
    """
    if not inputs:
        raise ValueError("reconstruction needs calibration inputs; got none")
    num_samples = sum(batch_size(batch) for batch in inputs)
    distributed.check_same_on_all_ranks({"settings": dataclasses.asdict(settings), "seed": seed,
                                         "samples": num_samples, "units": [unit.name for unit in units]},
                                        "the reconstruction")
    held = distributed.shard(num_samples)
    held_inputs = inputs_of_samples(inputs, held)
    rule = settings.rounding_stop
    holdout = 0 if rule is None else min(rule.holdout_samples, num_samples // 4)
    budget_bytes = settings.memory_budget_mb * 2**20
    results = []
    with _frozen(model, full_precision), tqdm(units, desc="reconstruction", unit="unit", disable=not progress) as bar:
        for unit in bar:
            bar.set_postfix(unit=unit.name)

            def reconstruct_unit(unit: ReconstructionUnit = unit) -> dict[str, Any]:
                started = time.perf_counter()
                cache, templates = capture(unit, model, full_precision, held_inputs, budget_bytes, cache_dir)
                captured = time.perf_counter()
                with cache:
                    _check_batch_fits(unit, cache, min(settings.batch_size, num_samples), settings.memory_budget_mb)
                    data = _UnitData(unit, cache, templates, seed, num_samples, held, holdout)
                    before = data.mse(settings.batch_size)
                    total = settings.weight_iters + settings.act_iters
                    with tqdm(total=total, desc=unit.name, leave=False, disable=not progress) as unit_bar:
                        rounding_steps = _learn_rounding(data, settings, unit_bar)
                        _learn_step_sizes(data, settings, unit_bar)
                    after = data.mse(settings.batch_size)
                on_disk = distributed.sum_over_ranks(torch.tensor([float(cache.on_disk)], device="cpu")).item() > 0  # any rank
                return UnitResult(unit.name, num_samples, before, after, on_disk,
                                  round(time.perf_counter() - started, 3), round(captured - started, 3),
                                  rounding_steps).to_dict()

            result = reconstruct_unit() if checkpoints is None else checkpoints.run(model, unit, reconstruct_unit)
            results.append(UnitResult(**result))
    return results

