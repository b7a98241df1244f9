"""What a quantized model is made of, module by module: which layers are quantized twins and with what bits
and splits, which attentions quantize their matmuls, which quantizers carry per-timestep tables over which
schedule, which blocks read a temporal feature cache, and whether the output has a per-step correction. A
checkpoint stores it, and loading rebuilds the model from it alone, so a model of any method (one registered
elsewhere included) loads without its code."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from tfmq.quant.config import FSC_SCOPES
from tfmq.quant.metadata_checks import expect, is_int
from tfmq.quant.nn.attention import QuantAttnProcessor
from tfmq.quant.nn.step_table import StepTable
from tfmq.quant.nn.output_correction import output_correction
from tfmq.quant.nn.temporal import (
    SkippedTimestepEmbedding,
    attach_output_correction,
    restore_temporal_cache,
    timestep_tables,
)
from tfmq.quant.tib import find_tib
from tfmq.quant.timestep_table import attach_timestep_tables, table_quantizers
from tfmq.quant.wrap import AttentionPlan, LayerPlan, WrappingPlan, apply_wrapping_plan, quant_layers

# The dtypes of a temporal cache's codes (`cache_code_dtype`), as the manifest names them.
_CACHE_DTYPES = {"uint8": torch.uint8, "int32": torch.int32, "float32": torch.float32}


@dataclass(frozen=True)
class TimestepTablesEntry:
    """The schedule the tables are indexed by, the FSC scope, and the quantizers that carry a table."""

    schedule: tuple[int, ...]
    scope: str
    quantizers: tuple[str, ...]


@dataclass(frozen=True)
class TemporalCachesEntry:
    """The modules whose cache site reads a temporal feature cache (`cache_sites`: residual blocks,
    transformer embedders), its codes' dtype, and whether a UNet's time MLP is skipped (no block reads the
    time embedding any more)."""

    blocks: tuple[str, ...]
    code_dtype: str
    time_embedding_skipped: bool


@dataclass(frozen=True)
class OutputCorrectionEntry:
    """The width of the output correction's rows (its steps are the timestep tables' schedule)."""

    channels: int


@dataclass(frozen=True)
class ModelManifest:
    plan: WrappingPlan
    timestep_tables: TimestepTablesEntry | None = None
    temporal_caches: TemporalCachesEntry | None = None
    output_correction: OutputCorrectionEntry | None = None

    @classmethod
    def of(cls, model: nn.Module) -> ModelManifest:
        """The manifest of a quantized model."""
        layers = {name: LayerPlan(layer.weight_quantizer.bits, layer.input_quantizer.bits, layer.split)
                  for name, layer in quant_layers(model)}
        attentions = {name: AttentionPlan(module.processor.query_quantizer.bits, module.processor.probs_quantizer.bits)
                      for name, module in model.named_modules()
                      if isinstance(module, Attention) and isinstance(module.processor, QuantAttnProcessor)}
        tables = timestep_tables(model)
        tables_entry = None if tables is None else TimestepTablesEntry(
            tuple(tables.schedule.tolist()), tables.scope, tuple(name for name, _ in table_quantizers(model)))
        caches = {name.rpartition(".")[0]: module for name, module in model.named_modules()
                  if isinstance(module, StepTable)}
        caches_entry = None
        if caches:
            dtypes = {str(cache.codes.dtype).removeprefix("torch.") for cache in caches.values()}
            if len(dtypes) != 1:
                raise ValueError(f"the temporal feature caches hold codes of several dtypes: {sorted(dtypes)}")
            embedding = find_tib(model).skippable_embedding
            skipped = embedding is not None and isinstance(model.get_submodule(embedding), SkippedTimestepEmbedding)
            caches_entry = TemporalCachesEntry(tuple(caches), dtypes.pop(), skipped)
        correction = output_correction(model)
        correction_entry = None if correction is None else OutputCorrectionEntry(correction.channels)
        return cls(WrappingPlan(layers, attentions), tables_entry, caches_entry, correction_entry)

    def build(self, base: nn.Module) -> nn.Module:
        """A quantized twin of `base` with every module of the manifest in place, uncalibrated: ready for the
        checkpoint's state. Raises ValueError where `base` cannot hold the manifest."""
        model = copy.deepcopy(base)
        apply_wrapping_plan(model, self.plan, init_weight_ranges=False)
        tables = self.timestep_tables
        if tables is not None and tables.scope != "none":
            attach_timestep_tables(model, torch.tensor(tables.schedule, device="cpu"), tables.scope)
            attached = tuple(name for name, _ in table_quantizers(model))
            if attached != tables.quantizers:
                raise ValueError(f"scope {tables.scope!r} gives this model's quantizers {len(attached)} tables, the "
                                 f"manifest lists {len(tables.quantizers)}")
        caches = self.temporal_caches
        if caches is not None:
            if tables is None:
                raise ValueError("temporal caches need the timestep tables' schedule")
            skipped = restore_temporal_cache(model, torch.tensor(tables.schedule, device="cpu"), caches.blocks,
                                             _CACHE_DTYPES[caches.code_dtype])
            if skipped != caches.time_embedding_skipped:
                raise ValueError("the time embedding is skipped in one of the model and its manifest, not the other")
        if self.output_correction is not None:
            if tables is None:
                raise ValueError("an output correction needs the timestep tables' schedule")
            attach_output_correction(model, torch.tensor(tables.schedule, device="cpu"),
                                     torch.zeros(len(tables.schedule), self.output_correction.channels,
                                                 device="cpu"))
        return model

    def to_dict(self) -> dict[str, Any]:
        tables, caches, correction = self.timestep_tables, self.temporal_caches, self.output_correction
        return {
            "layers": {name: {"w_bits": plan.w_bits, "a_bits": plan.a_bits, "split": plan.split}
                       for name, plan in self.plan.layers.items()},
            "attentions": {name: {"a_bits": plan.a_bits, "probs_bits": plan.probs_bits}
                           for name, plan in self.plan.attentions.items()},
            "timestep_tables": None if tables is None else {
                "schedule": list(tables.schedule), "scope": tables.scope, "quantizers": list(tables.quantizers)},
            "temporal_caches": None if caches is None else {
                "blocks": list(caches.blocks), "code_dtype": caches.code_dtype,
                "time_embedding_skipped": caches.time_embedding_skipped},
            "output_correction": None if correction is None else {"channels": correction.channels},
        }

    @classmethod
    def from_dict(cls, values: Any) -> ModelManifest:
        """Inverse of `to_dict`; raises ValueError naming the first entry of a wrong type or value. A manifest
        written before output corrections existed has no `output_correction` entry: none."""
        _expect_keys(values, "manifest", {"layers", "attentions", "timestep_tables", "temporal_caches"},
                     optional={"output_correction"})
        layers = {}
        for name, entry in _named_entries(values["layers"], "manifest.layers"):
            _expect_keys(entry, f"manifest.layers[{name!r}]", {"w_bits", "a_bits", "split"})
            expect(all(_is_bits(entry[key]) for key in ("w_bits", "a_bits")),
                   f"manifest.layers[{name!r}] bit widths must be ints or null, got {entry}")
            expect(entry["split"] is None or (is_int(entry["split"]) and entry["split"] > 0),
                   f"manifest.layers[{name!r}].split must be a positive int or null")
            layers[name] = LayerPlan(entry["w_bits"], entry["a_bits"], entry["split"])
        attentions = {}
        for name, entry in _named_entries(values["attentions"], "manifest.attentions"):
            _expect_keys(entry, f"manifest.attentions[{name!r}]", {"a_bits", "probs_bits"})
            expect(all(_is_bits(entry[key]) for key in ("a_bits", "probs_bits")),
                   f"manifest.attentions[{name!r}] bit widths must be ints or null, got {entry}")
            attentions[name] = AttentionPlan(entry["a_bits"], entry["probs_bits"])
        return cls(WrappingPlan(layers, attentions), _tables_entry(values["timestep_tables"]),
                   _caches_entry(values["temporal_caches"]), _correction_entry(values.get("output_correction")))


def _tables_entry(values: Any) -> TimestepTablesEntry | None:
    if values is None:
        return None
    _expect_keys(values, "manifest.timestep_tables", {"schedule", "scope", "quantizers"})
    schedule, quantizers = values["schedule"], values["quantizers"]
    expect(isinstance(schedule, list) and schedule and all(map(is_int, schedule)),
           "manifest.timestep_tables.schedule must be a non-empty list of ints")
    expect(values["scope"] in FSC_SCOPES, f"manifest.timestep_tables.scope must be one of {', '.join(FSC_SCOPES)}")
    expect(isinstance(quantizers, list) and all(isinstance(name, str) for name in quantizers),
           "manifest.timestep_tables.quantizers must be a list of names")
    return TimestepTablesEntry(tuple(schedule), values["scope"], tuple(quantizers))


def _caches_entry(values: Any) -> TemporalCachesEntry | None:
    if values is None:
        return None
    _expect_keys(values, "manifest.temporal_caches", {"blocks", "code_dtype", "time_embedding_skipped"})
    blocks = values["blocks"]
    expect(isinstance(blocks, list) and blocks and all(isinstance(block, str) for block in blocks),
           "manifest.temporal_caches.blocks must be a non-empty list of names")
    expect(values["code_dtype"] in _CACHE_DTYPES,
           f"manifest.temporal_caches.code_dtype must be one of {', '.join(_CACHE_DTYPES)}")
    expect(isinstance(values["time_embedding_skipped"], bool),
           "manifest.temporal_caches.time_embedding_skipped must be true or false")
    return TemporalCachesEntry(tuple(blocks), values["code_dtype"], values["time_embedding_skipped"])


def _correction_entry(values: Any) -> OutputCorrectionEntry | None:
    if values is None:
        return None
    _expect_keys(values, "manifest.output_correction", {"channels"})
    expect(is_int(values["channels"]) and values["channels"] > 0,
           "manifest.output_correction.channels must be a positive int")
    return OutputCorrectionEntry(values["channels"])


def _named_entries(values: Any, where: str) -> list[tuple[str, Any]]:
    expect(isinstance(values, dict), f"{where} must be an object")
    return list(values.items())


def _expect_keys(values: Any, where: str, keys: set[str], optional: set[str] = frozenset()) -> None:
    expect(isinstance(values, dict) and keys <= set(values) <= keys | optional,
           f"{where} must be an object of {', '.join(sorted(keys | optional))}")


def _is_bits(value: object) -> bool:
    return value is None or (is_int(value) and 2 <= value <= 32)
