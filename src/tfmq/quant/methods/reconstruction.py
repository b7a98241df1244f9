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

`unet_units` splits a diffusers UNet into the units of BRECQ; a method with other needs (TFMQ's temporal
information block: inputs are the time embedding, targets are every resnet's temporal feature) builds its
own `ReconstructionUnit`s and passes them to the same loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn
from tqdm import tqdm

from tfmq.quant.config import ReconstructionSettings
from tfmq.quant.methods.adaround import RoundingRegularizer, adaptive_rounding
from tfmq.quant.methods.unit_cache import UnitCache
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.wrap import activation_quantizers, quant_layers, quantizers

# The blocks of BRECQ in a diffusers UNet; quantized layers outside all of them are units of their own.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    ResnetBlock2D, ResnetBlockCondNorm2D, Transformer2DModel, Attention, Downsample2D, Upsample2D,
)
# The unit's error is reported (not trained) on this many of its cached samples, before and after.
REPORT_SAMPLES = 256

ModelInputs = Mapping[str, Any]


@dataclass(frozen=True)
class Call:
    """The arguments of one call of a module, as a forward pre-hook sees them.

    In a cached call template, batched tensors are `_Slot`s naming their cached rows: `filled` puts
    the rows of a batch back in their place.
    """

    args: tuple
    kwargs: dict

    def filled(self, rows: Mapping[str, torch.Tensor]) -> Call:
        def fill(value: Any) -> Any:
            return rows[value.key] if isinstance(value, _Slot) else value

        return Call(tuple(fill(value) for value in self.args), {k: fill(v) for k, v in self.kwargs.items()})


@dataclass(frozen=True)
class ReconstructionUnit:
    """What to reconstruct together, from which inputs, against which targets.

    `inputs_from`: modules of the quantized model; the arguments of their (single) call in a model
    forward are the unit's inputs. `targets_from`: modules of the full-precision model; their outputs
    (flattened to a tuple of tensors) are the targets. `forward(*calls)` replays the quantized unit from
    one `Call` per `inputs_from` module and returns what is compared with the targets, in their order.
    `layers` get AdaRound, the `scale` of `activation_quantizers` gets LSQ; either may be empty.
    """

    name: str
    inputs_from: tuple[nn.Module, ...]
    targets_from: tuple[nn.Module, ...]
    forward: Callable[..., Any]
    layers: tuple[QuantLayer, ...]
    activation_quantizers: tuple[UniformQuantizer, ...]

    @classmethod
    def block(cls, name: str, model: nn.Module, full_precision: nn.Module) -> ReconstructionUnit:
        """The submodule `name` of `model` against the same-named submodule of `full_precision`,
        learning every quantized layer and activation quantizer inside it."""
        module = model.get_submodule(name)

        def replay(call: Call) -> Any:
            return module(*call.args, **call.kwargs)

        return cls(
            name=name,
            inputs_from=(module,),
            targets_from=(full_precision.get_submodule(name),),
            forward=replay,
            layers=tuple(layer for _, layer in quant_layers(module)),
            activation_quantizers=tuple(quantizer for _, quantizer in activation_quantizers(module)),
        )


@dataclass(frozen=True)
class UnitResult:
    """How one unit went: mean squared error against the target (on up to REPORT_SAMPLES of its
    cached samples) before and after reconstruction, and whether its cache went to disk."""

    name: str
    samples: int
    mse_before: float
    mse_after: float
    on_disk: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Units of a diffusers UNet


def unet_units(model: nn.Module, full_precision: nn.Module, example_inputs: ModelInputs) -> list[ReconstructionUnit]:
    """The BRECQ units of a wrapped UNet, in the order one forward of `example_inputs` reaches them.

    Units: every outermost ResnetBlock2D, attention / Transformer2DModel and down/up-sampler, and each
    quantized layer that lies in none of them (e.g. the time-embedding linears; conv_in and conv_out
    when they are quantized). Modules with nothing quantized, or that the forward never calls, are
    left out. The resnets' `time_emb_proj` belongs to its block, as in Q-Diffusion.
    """
    names = _unit_names(model)
    order = _call_order(full_precision, names, example_inputs)
    return [ReconstructionUnit.block(name, model, full_precision) for name in order]


def _unit_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        if isinstance(module, BLOCK_TYPES):
            covered.append(name)
            if any(quantizer.bits is not None for _, quantizer in quantizers(module)):
                names.append(name)
        elif isinstance(module, QuantLayer):
            covered.append(name)
            names.append(name)
    return names


def _call_order(model: nn.Module, names: Sequence[str], inputs: ModelInputs) -> list[str]:
    """`names` sorted by when one forward of `model` first calls them (registration order differs:
    diffusers registers a block's attentions before the resnets that run first)."""
    order: list[str] = []
    handles = []
    for name in names:
        def record(module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


# ----------------------------------------------------------------------------------------------------
# Capturing a unit's inputs and targets


class _Captured(Exception):
    """Raised by a hook to end a forward once everything the unit needs has been recorded."""


@dataclass(frozen=True)
class _Slot:
    """Where a batched tensor goes when a call is rebuilt from cached rows."""

    key: str


def _tensors(output: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a module output (a tensor, a tuple, a diffusers output object), in order."""
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        return tuple(tensor for item in output for tensor in _tensors(item))
    return ()


def _batch_size(inputs: ModelInputs) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("model inputs must hold at least one batched tensor (e.g. `sample`)")


def _template(call: Call, prefix: str, batch: int) -> tuple[Call, dict[str, torch.Tensor]]:
    """Split a call into a template (batched tensors replaced by slots) and its batched tensors.

    A tensor argument is batched when its first dimension is the model's batch size; everything else
    (None, flags, sizes) is static and must be the same in every calibration batch.
    """
    rows: dict[str, torch.Tensor] = {}

    def slot(key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            rows[key] = value
            return _Slot(key)
        return value

    args = tuple(slot(f"{prefix}.arg{index}", value) for index, value in enumerate(call.args))
    kwargs = {name: slot(f"{prefix}.{name}", value) for name, value in call.kwargs.items()}
    return Call(args, kwargs), rows


def _same_static(first: Any, other: Any) -> bool:
    if isinstance(first, torch.Tensor) or isinstance(other, torch.Tensor):
        return (
            isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor)
            and first.shape == other.shape and torch.equal(first, other)
        )
    try:
        return bool(first == other)
    except Exception:  # objects without a usable ==: trust they are the same
        return True


def _check_same_template(unit: str, first: Call, other: Call) -> None:
    pairs = list(zip(first.args, other.args)) + [(first.kwargs.get(k), v) for k, v in other.kwargs.items()]
    if (
        len(first.args) != len(other.args) or first.kwargs.keys() != other.kwargs.keys()
        or not all(_same_static(a, b) for a, b in pairs)
    ):
        raise ValueError(
            f"unit {unit}: a non-batched argument changes between calibration batches; "
            "give every batch the same static arguments"
        )


def _record_calls(modules: Sequence[nn.Module], calls: list[Call | None]) -> list[Any]:
    """Pre-hooks that fill `calls` and stop the forward once every module has been called."""
    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if calls[index] is not None:
                raise ValueError(f"{type(module).__name__} is called more than once per forward: cannot capture it")
            calls[index] = Call(args, dict(kwargs))
            if all(call is not None for call in calls):
                raise _Captured
        return hook

    return [module.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, module in enumerate(modules)]


def _record_outputs(modules: Sequence[nn.Module], outputs: list[Any]) -> list[Any]:
    """Forward hooks that fill `outputs` and stop the forward once every module has returned."""
    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if outputs[index] is not None:
                raise ValueError(f"{type(module).__name__} is called more than once per forward: cannot capture it")
            outputs[index] = _tensors(output)
            if all(output is not None for output in outputs):
                raise _Captured
        return hook

    return [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]


def _run_until_captured(model: nn.Module, inputs: ModelInputs, register: Callable[[], list[Any]]) -> None:
    handles = register()
    try:
        model(**inputs)
    except _Captured:
        return
    finally:
        for handle in handles:
            handle.remove()
    raise ValueError("the forward ended before reaching every module of the unit")


@torch.no_grad()
def capture(
    unit: ReconstructionUnit,
    model: nn.Module,
    full_precision: nn.Module,
    inputs: Sequence[ModelInputs],
    budget_bytes: float,
    directory: str | Path | None = None,
) -> tuple[UnitCache, list[Call]]:
    """The unit's inputs (from `model` as it is now) and targets (from `full_precision`) over `inputs`,
    cached per sample, with the call templates that turn cached rows back into the unit's arguments.

    Each forward stops as soon as the unit's modules have been reached.
    """
    cache = UnitCache(sum(_batch_size(batch) for batch in inputs), budget_bytes, directory)
    templates: list[Call] = []
    try:
        for batch in inputs:
            size = _batch_size(batch)
            calls: list[Call | None] = [None] * len(unit.inputs_from)
            _run_until_captured(model, batch, lambda: _record_calls(unit.inputs_from, calls))
            outputs: list[Any] = [None] * len(unit.targets_from)
            _run_until_captured(full_precision, batch, lambda: _record_outputs(unit.targets_from, outputs))

            rows: dict[str, torch.Tensor] = {}
            batch_templates = []
            for index, call in enumerate(calls):
                template, call_rows = _template(call, f"input{index}", size)
                batch_templates.append(template)
                rows.update(call_rows)
            targets = [tensor for output in outputs for tensor in output]
            if not targets or any(target.dim() == 0 or target.shape[0] != size for target in targets):
                raise ValueError(f"unit {unit.name}: its targets must be tensors with the batch dimension first")
            rows.update({f"target{index}": target for index, target in enumerate(targets)})

            if templates:
                for first, other in zip(templates, batch_templates):
                    _check_same_template(unit.name, first, other)
            else:
                templates = batch_templates
            cache.append(rows)
    except BaseException:
        cache.close()
        raise
    return cache, templates


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
        error = (output - target).pow(2)
        total = total + (error.sum(dim=1) if error.dim() > 1 else error).mean()
    return total


class _UnitData:
    """Random batches of a captured unit, and its output replayed from them."""

    def __init__(self, unit: ReconstructionUnit, cache: UnitCache, templates: list[Call], seed: int) -> None:
        self.unit = unit
        self.cache = cache
        self.templates = templates
        self.target_keys = sorted((key for key in cache.keys if key.startswith("target")), key=lambda k: int(k[6:]))
        self.generator = torch.Generator().manual_seed(seed)

    def random_indices(self, batch_size: int) -> torch.Tensor:
        return torch.randperm(self.cache.num_samples, generator=self.generator)[:batch_size]

    def loss(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.cache.rows(indices)
        calls = [template.filled(rows) for template in self.templates]
        outputs = _tensors(self.unit.forward(*calls))
        return reconstruction_loss(outputs, [rows[key] for key in self.target_keys])

    @torch.no_grad()
    def mse(self, batch_size: int) -> float:
        """Mean squared error per element on the first REPORT_SAMPLES samples."""
        count = min(self.cache.num_samples, REPORT_SAMPLES)
        total, elements = 0.0, 0
        for start in range(0, count, batch_size):
            rows = self.cache.rows(torch.arange(start, min(start + batch_size, count)))
            calls = [template.filled(rows) for template in self.templates]
            outputs = _tensors(self.unit.forward(*calls))
            for output, key in zip(outputs, self.target_keys):
                total += (output - rows[key]).pow(2).sum().item()
                elements += output.numel()
        return total / max(elements, 1)


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


def _learn_rounding(data: _UnitData, settings: ReconstructionSettings, bar: tqdm) -> None:
    """AdaRound on the unit's layers with its activations unquantized, then hard rounding."""
    unit = data.unit
    if settings.weight_iters == 0 or not any(layer.weight_quantizer.bits is not None for layer in unit.layers):
        return
    regularizer = RoundingRegularizer(settings.weight_iters)
    with _activations_off(unit.activation_quantizers), adaptive_rounding(unit.layers) as roundings:
        optimizer = torch.optim.Adam([rounding.rounding for rounding in roundings], lr=settings.weight_lr)
        for iteration in range(settings.weight_iters):
            reconstruction = data.loss(data.random_indices(settings.batch_size))
            loss = reconstruction + regularizer(roundings, iteration)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if iteration % 50 == 0:
                bar.set_postfix(phase="weights", loss=f"{reconstruction.item():.3g}")


def _learn_step_sizes(data: _UnitData, settings: ReconstructionSettings, bar: tqdm) -> None:
    """LSQ: Adam on the activation quantizers' step sizes, learning rate decayed on a cosine to 0."""
    steps = [quantizer.scale for quantizer in data.unit.activation_quantizers if quantizer.bits is not None]
    if settings.act_iters == 0 or not steps:
        return
    for step in steps:
        step.requires_grad_(True)
    try:
        optimizer = torch.optim.Adam(steps, lr=settings.act_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.act_iters, eta_min=0.0)
        for iteration in range(settings.act_iters):
            loss = data.loss(data.random_indices(settings.batch_size))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            if iteration % 50 == 0:
                bar.set_postfix(phase="activations", loss=f"{loss.item():.3g}")
    finally:
        for step in steps:
            step.requires_grad_(False)


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
) -> list[UnitResult]:
    """Reconstruct `units` of `model` in order against `full_precision`, over the model inputs `inputs`
    (keyword arguments of one forward each). Changes `model` in place: hardened weights, learnt step sizes.

    Batches are drawn with a generator seeded by `seed`, so a run is reproducible. Caches beyond
    `settings.memory_budget_mb` go to a temporary folder under `cache_dir` (the system's by default).
    """
    if not inputs:
        raise ValueError("reconstruction needs calibration inputs; got none")
    budget_bytes = settings.memory_budget_mb * 2**20
    results = []
    with _frozen(model, full_precision), tqdm(units, desc="reconstruction", unit="unit", disable=not progress) as bar:
        for unit in bar:
            bar.set_postfix(unit=unit.name)
            started = time.perf_counter()
            cache, templates = capture(unit, model, full_precision, inputs, budget_bytes, cache_dir)
            with cache:
                data = _UnitData(unit, cache, templates, seed)
                before = data.mse(settings.batch_size)
                total = settings.weight_iters + settings.act_iters
                with tqdm(total=total, desc=unit.name, leave=False, disable=not progress) as unit_bar:
                    _learn_rounding(data, settings, unit_bar)
                    _learn_step_sizes(data, settings, unit_bar)
                after = data.mse(settings.batch_size)
            results.append(UnitResult(unit.name, cache.num_samples, before, after, cache.on_disk,
                                      round(time.perf_counter() - started, 3)))
    return results

