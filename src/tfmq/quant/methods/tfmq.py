"""TFMQ-DM: block reconstruction that keeps the temporal features apart, and the journal version's
temporal-feature cache. `quantize_tfmq` is the whole recipe, in the order of the authors' scripts.

- TIAR (`reconstruct_tib`): the Temporal Information Block (`tib`) is reconstructed first, as one unit:
  AdaRound on all its linears jointly, against every residual block's full-precision temporal feature,
  from the timesteps alone (every timestep of the schedule, or of the training range for a schedule-free
  config, no images). The other BRECQ units follow
  (`block_units`) without the TIB's layers: their inputs are captured from the model with the TIB
  already hardened, so each block reads its temporal feature as an input its loss cannot bend.
- FSC is per-timestep activation calibration: `timestep_table.calibrate_timestep_tables`.
- Cache-based maintenance (`maintain_temporal_features`): each block's temporal feature is computed in full
  precision for every scheduled timestep, quantized per timestep, and served from a table
  (`tfmq.quant.nn.temporal.StepTable`) by the same timestep-row selection as FSC. When every
  block reads a cache the time MLP is skipped too (`SkippedTimestepEmbedding`): the TIB leaves the
  sampling loop.
- Disturbance-aware selection: per block, the cache is used only where its error against the
  full-precision feature is not above the TIB path's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tfmq.devices import module_device
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.config import TFMQConfig
from tfmq.quant.methods.capture import Call, ModelInputs
from tfmq.quant.methods.qdiff import reconstruct_qdiff, reconstruction_record
from tfmq.quant.methods.reconstruction import UnitResult, reconstruct
from tfmq.quant.methods.registry import MethodInputs, register_method
from tfmq.quant.methods.resume import UnitCheckpoints
from tfmq.quant.methods.scheduled_lookup import restore_projections, serve_caches_for_reconstruction
from tfmq.quant.methods.units import ReconstructionUnit, unet_units
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.nn.quantizer import quantize_codes, range_to_scale_zero_point
from tfmq.quant.nn.step_table import StepTable
from tfmq.quant.nn.temporal import cache_code_dtype, cache_site_outputs_by_timestep, install_temporal_cache
from tfmq.quant.tib import TemporalInformationBlock, check_temporal_cache_supported, find_tib
from tfmq.quant.wrap import quantizers

TIB_UNIT = "temporal_information_block"
# {residual block: its cache} and the selection's JSON entries, as `choose_temporal_caches` returns them.
ChosenCaches = tuple[dict[str, StepTable], dict[str, Any]]


# ----------------------------------------------------------------------------------------------------
# TIAR


class TemporalInformationModel(nn.Module):
    """A UNet's TIB run as a model of its own: timesteps (and class labels) in, the temporal features out,
    one per residual block in forward order. What TIAR captures its inputs from and replays."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.tib = find_tib(unet)

    def forward(self, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return tuple(self.tib.temporal_features(timesteps, class_labels).values())


def _tib_layers(model: nn.Module, tib: TemporalInformationBlock) -> tuple[QuantLayer, ...]:
    """The TIB's quantized linears (those outside keep_fp)."""
    layers = (model.get_submodule(name) for name in tib.linear_names)
    return tuple(layer for layer in layers if isinstance(layer, QuantLayer))


def tib_unit(model: TemporalInformationModel, full_precision: TemporalInformationModel) -> ReconstructionUnit:
    """The TIB as one reconstruction unit: every quantized linear of it and their input quantizers, against
    the full-precision output of every block's `time_emb_proj`."""
    layers = _tib_layers(model.unet, model.tib)

    def replay(call: Call) -> tuple[torch.Tensor, ...]:
        return model(*call.args, **call.kwargs)

    return ReconstructionUnit(
        name=TIB_UNIT,
        inputs_from=(model,),
        targets_from=tuple(full_precision.unet.get_submodule(name) for name in full_precision.tib.feature_names),
        forward=replay,
        layers=layers,
        activation_quantizers=tuple(
            quantizer for layer in layers
            for quantizer in (layer.input_quantizer, layer.split_input_quantizer) if quantizer is not None
        ),
    )


def reconstruct_tib(
    model: nn.Module,
    full_precision: nn.Module,
    timesteps: torch.Tensor,
    config: TFMQConfig,
    *,
    class_labels: torch.Tensor | None = None,
    batch_size: int = 64,
    progress: bool = True,
    checkpoints: UnitCheckpoints | None = None,
) -> UnitResult | None:
    """TIAR: reconstruct the TIB of the wrapped UNet `model` against `full_precision` on `timesteps` (with
    `class_labels`, one per timestep, for class-conditional UNets); None if the TIB has no quantized layer.

    Pass every timestep the sampler visits: the features depend on nothing else, and a reconstruction on a
    few timesteps fits those and loses elsewhere.
    """
    quantized, reference = TemporalInformationModel(model), TemporalInformationModel(full_precision)
    unit = tib_unit(quantized, reference)
    if not unit.layers:
        return None
    device = module_device(model)
    timesteps = torch.as_tensor(timesteps, device=device).reshape(-1)
    inputs: list[dict[str, torch.Tensor]] = [{"timesteps": chunk} for chunk in timesteps.split(batch_size)]
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        if len(labels) != len(timesteps):
            raise ValueError(f"{len(labels)} class labels for {len(timesteps)} timesteps: give one per timestep")
        for batch, chunk in zip(inputs, labels.split(batch_size)):
            batch["class_labels"] = chunk
    (result,) = reconstruct(quantized, reference, [unit], inputs, config.tiar_reconstruction, progress=progress,
                            checkpoints=checkpoints)
    return result


def block_units(model: nn.Module, full_precision: nn.Module, example_inputs: ModelInputs) -> list[ReconstructionUnit]:
    """The BRECQ units of the wrapped UNet without the TIB's layers and their input quantizers: the
    time-embedding linears are no units of their own, and each resnet unit leaves its `time_emb_proj`
    as it is (TIAR has learnt it)."""
    tib_layers = _tib_layers(model, find_tib(model))
    tib_layer_ids = {id(layer) for layer in tib_layers}
    tib_quantizer_ids = {id(quantizer) for layer in tib_layers for _, quantizer in quantizers(layer)}
    units = []
    for unit in unet_units(model, full_precision, example_inputs):
        layers = tuple(layer for layer in unit.layers if id(layer) not in tib_layer_ids)
        activations = tuple(q for q in unit.activation_quantizers if id(q) not in tib_quantizer_ids)
        if layers or activations:
            units.append(dataclasses.replace(unit, layers=layers, activation_quantizers=activations))
    return units


@register_method(TFMQConfig)
def quantize_tfmq(model: nn.Module, inputs: MethodInputs) -> dict[str, Any]:
    """TIAR on the whole schedule, then the other units on the weight steps, in forward order; FSC; then,
    with `temporal_cache`, the caches installed.

    With TIAR the caches are chosen once the TIB is final and the blocks are reconstructed reading them,
    so they learn on the features sampling will give them, not on the TIB path's. Without TIAR the blocks
    are reconstructed as in Q-Diffusion, and the caches are chosen after FSC.
    """
    config, full_precision, calibration = inputs.config, inputs.full_precision, inputs.calibration
    batches = inputs.weight_batches()
    schedule = inputs.table_schedule
    chosen = None
    if config.tiar:
        timesteps, labels = temporal_inputs(calibration, schedule)
        tib_result = reconstruct_tib(model, full_precision, timesteps, config, class_labels=labels,
                                     progress=inputs.progress, checkpoints=inputs.checkpoints)
        if config.temporal_cache:
            chosen = choose_temporal_caches(model, full_precision, schedule, config)
            serve_caches_for_reconstruction(model, schedule, chosen[0], keyed_at=calibration.schedule)
        try:
            results = reconstruct(model, full_precision, block_units(model, full_precision, batches[0]), batches,
                                  config.reconstruction, progress=inputs.progress, checkpoints=inputs.checkpoints)
        finally:
            restore_projections(model)
        results = ([] if tib_result is None else [tib_result]) + results
    else:
        results = reconstruct_qdiff(model, full_precision, batches, config, progress=inputs.progress,
                                    checkpoints=inputs.checkpoints)
    inputs.calibrate_timestep_tables(model)
    record = reconstruction_record(results, config)
    if config.temporal_cache:
        record.update(maintain_temporal_features(model, full_precision, schedule, config, chosen))
    return record


def temporal_inputs(
    calibration: CalibrationSet, schedule: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the TIB is reconstructed on: every timestep of `schedule` (default: the calibration's), or for a
    class-conditional model every (timestep, label) pair of them and of the calibration's labels (the
    unconditional branch's null label included): the calibration's own pairs when `schedule` is its own."""
    schedule = calibration.schedule if schedule is None else torch.as_tensor(schedule, device="cpu")
    labels = calibration.conditions.get("class_labels")
    if labels is None:
        return schedule, None
    if torch.equal(schedule.cpu(), calibration.schedule.cpu()):
        pairs = torch.stack([calibration.timesteps.long(), labels.long()], dim=1).unique(dim=0)
    else:
        pairs = torch.cartesian_prod(schedule.long().cpu(), labels.long().cpu().unique())
    return pairs[:, 0], pairs[:, 1]


# ----------------------------------------------------------------------------------------------------
# Cache-based maintenance and disturbance-aware selection


def quantize_rows(features: torch.Tensor, bits: int | None) -> StepTable:
    """A cache of `features` (timesteps, channels), each row quantized to `bits` on the min-max grid of that
    row alone; `bits=None` keeps the values."""
    if bits is None:
        return StepTable(features, features.new_ones(len(features)), features.new_zeros(len(features)))
    low, high = features.min(dim=1, keepdim=True).values, features.max(dim=1, keepdim=True).values
    scale, zero_point = range_to_scale_zero_point(low, high, bits)
    codes = quantize_codes(features, scale, zero_point, bits).to(cache_code_dtype(bits))
    return StepTable(codes, scale.flatten(), zero_point.flatten())


@torch.no_grad()
def cached_temporal_features(
    full_precision: nn.Module, schedule: torch.Tensor, bits: int | None
) -> dict[str, StepTable]:
    """{owner: its cache}: the full-precision output of every cache site of the TIB (`cache_sites`: each
    residual block's temporal feature, each transformer embedder's time MLP) at every timestep of
    `schedule`, each row quantized to `bits` on its own range."""
    tib = find_tib(full_precision)
    check_temporal_cache_supported(full_precision, tib)
    outputs = tib.site_outputs(torch.as_tensor(schedule, device=module_device(full_precision)))
    return {owner: quantize_rows(values, bits) for owner, values in outputs.items()}


@torch.no_grad()
def temporal_path_errors(
    model: nn.Module, full_precision: nn.Module, schedule: torch.Tensor, cached: Mapping[str, StepTable]
) -> dict[str, dict[str, Any]]:
    """Per cache site (owner), the mean squared error over all timesteps of `schedule` against the
    full-precision output of the TIB path (the quantized model's TIB, with its timestep rows if it has
    tables) and of the cache `cached`, and the choice: "cache" unless the TIB path is strictly better."""
    schedule = torch.as_tensor(schedule, device=module_device(full_precision))
    reference = find_tib(full_precision).site_outputs(schedule)
    tib_path = cache_site_outputs_by_timestep(model, schedule)
    errors = {}
    for owner, values in reference.items():
        tib_error = (tib_path[owner] - values).pow(2).mean().item()
        cache_error = (cached[owner].values() - values).pow(2).mean().item()
        errors[owner] = {"tib_path_mse": tib_error, "cache_mse": cache_error,
                         "choice": "cache" if cache_error <= tib_error else "tib"}
    return errors


def choose_temporal_caches(
    model: nn.Module, full_precision: nn.Module, schedule: torch.Tensor, config: TFMQConfig
) -> ChosenCaches:
    """{residual block: its cache} for every block, or with `config.temporal_selection` only where the
    cache's error is not above the TIB path's (of `model` as it is now), and the selection's JSON entries."""
    cached = cached_temporal_features(full_precision, schedule, config.a_bits)
    entries: dict[str, Any] = {}
    if config.temporal_selection:
        errors = temporal_path_errors(model, full_precision, schedule, cached)
        entries["temporal_selection"] = errors
        cached = {block: values for block, values in cached.items() if errors[block]["choice"] == "cache"}
    return cached, entries


def maintain_temporal_features(
    model: nn.Module,
    full_precision: nn.Module,
    schedule: torch.Tensor,
    config: TFMQConfig,
    chosen: ChosenCaches | None = None,
) -> dict[str, Any]:
    """The journal version's maintenance on the reconstructed (and FSC-calibrated) `model`: install the
    caches `chosen` by `choose_temporal_caches` (chosen now if None). Returns the checkpoint's JSON entries
    (`temporal_cache`, `temporal_selection`), which `restore_temporal_cache` needs to rebuild the model
    before loading its state."""
    cached, entries = chosen if chosen is not None else choose_temporal_caches(model, full_precision, schedule,
                                                                               config)
    skipped = install_temporal_cache(model, schedule, cached)
    entries = dict(entries)
    entries["temporal_cache"] = {"cached_blocks": list(cached), "time_embedding_skipped": skipped,
                                 "steps": len(schedule), "bytes": temporal_cache_stats(model).bytes}
    return entries


@dataclass(frozen=True)
class TemporalCacheStats:
    """The temporal feature caches of a model: how many blocks read one, over how many timesteps, how many
    feature values they hold, and their bytes (codes, and a scale and zero point per row)."""

    blocks: int
    steps: int
    values: int
    bytes: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def temporal_cache_stats(model: nn.Module) -> TemporalCacheStats:
    caches = [module for module in model.modules() if isinstance(module, StepTable)]
    return TemporalCacheStats(
        blocks=len(caches),
        steps=len(caches[0].codes) if caches else 0,
        values=sum(cache.codes.numel() for cache in caches),
        bytes=sum(buffer.numel() * buffer.element_size() for cache in caches for buffer in cache.buffers()),
    )
