"""What to quantize and how: one frozen config type per method, which travels with a quantized model as JSON.

`QuantConfig` holds what every method shares (bit widths, range inits, per-layer rules, FSC); each method
subclasses it with its own fields and a name (`class RTNConfig(QuantConfig, method="rtn")`), and
`tfmq.quantize` runs the handler registered for the config's type (`tfmq.quant.methods.registry`). The
defaults of each type are what `tfmq quantize --method NAME` and the demo use.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from tfmq.errors import TfmqError
from tfmq.quant.reconstruction_settings import (
    RECON_PRESETS,
    ROUNDING_STARTS,
    TFMQ_BLOCK_PRESETS,
    TIAR_PRESETS,
    ReconstructionSettings,
    RoundingStop,
)

RANGE_INITS = ("mse", "minmax", "symmetric")
WEIGHT_BITS = range(2, 9)
ACTIVATION_BITS = range(4, 17)
SOFTMAX_BITS = range(2, 17)
# Which activation quantizers get one row of parameters per sampling timestep (finite-set calibration):
# none; those reading the Temporal Information Block's features (the paper); every one (the authors' scripts).
FSC_SCOPES = ("none", "temporal", "all")
FSC_FILLS = ("linear", "nearest")  # how a schedule-free table's uncalibrated rows get their ranges
INHERIT = "inherit"
REGEX_PREFIX = "re:"
# {method name: its config type}, filled by subclassing QuantConfig with `method=`.
CONFIG_TYPES: dict[str, type[QuantConfig]] = {}


def _check_bits(name: str, value: Any, allowed: range) -> None:
    # bool is an int in Python: reject it explicitly so `w_bits=True` is not read as 1 bit.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise TfmqError(f"{name} must be an int in {allowed.start}..{allowed.stop - 1} or None, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TfmqError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TfmqError(f"{name} must be True or False, got {value!r}")


def _check_count(name: str, value: Any, minimum: int, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TfmqError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def _check_number(name: str, value: Any, *, allow_zero: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or value < 0 or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise TfmqError(f"{name} must be a finite number {bound}{' or None' if optional else ''}, got {value!r}")


# The first and last layer of the diffusers denoisers, kept in full precision by default: a UNet's convs, a
# DiT's or PixArt's patch embedding and final Linear (root names only: a UNet's inner `proj_out`s differ).
FIRST_AND_LAST_LAYERS = ("conv_in", "conv_out", "pos_embed.proj", "proj_out_2", "proj_out")


@dataclass(frozen=True)
class LayerRule:
    """Bit widths for the layers (Conv2d, Linear, attention) whose qualified name, or a parent's, matches
    `pattern`: a glob (an exact name is one) or, after "re:", a regular expression matched in full.

    A field left at "inherit" keeps the config's value; a later rule overrides an earlier one field by field.
    A layer whose rules set both bit widths to None stays the original full-precision module.
    """

    pattern: str
    w_bits: int | None | Literal["inherit"] = INHERIT
    a_bits: int | None | Literal["inherit"] = INHERIT

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise TfmqError(f"a layer rule's pattern must be a non-empty string, got {self.pattern!r}")
        if self.pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(self.pattern[len(REGEX_PREFIX):])
            except re.error as exc:
                raise TfmqError(f"layer rule {self.pattern!r}: not a regular expression ({exc})") from exc
        for name, allowed in (("w_bits", WEIGHT_BITS), ("a_bits", ACTIVATION_BITS)):
            value = getattr(self, name)
            if value != INHERIT:
                _check_bits(f"layer rule {self.pattern!r}: {name}", value, allowed)

    @classmethod
    def full_precision(cls, pattern: str) -> LayerRule:
        """The rule that leaves the matching layers unquantized."""
        return cls(pattern, w_bits=None, a_bits=None)

    def matches(self, name: str) -> bool:
        parts = name.split(".")
        prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
        if self.pattern.startswith(REGEX_PREFIX):
            expression = re.compile(self.pattern[len(REGEX_PREFIX):])
            return any(expression.fullmatch(prefix) for prefix in prefixes)
        return any(fnmatch.fnmatchcase(prefix, self.pattern) for prefix in prefixes)

    def to_dict(self) -> dict[str, Any]:
        """The pattern and the fields it sets (inherited ones left out)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value != INHERIT}


@dataclass(frozen=True)
class LayerBits:
    """What the rules give one layer: its bit widths, and whether it stays the original module."""

    w_bits: int | None
    a_bits: int | None
    full_precision: bool


def _layer_rules(value: Any) -> tuple[LayerRule, ...]:
    """Rules from a sequence of LayerRule or their dicts (JSON gives lists of dicts)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise TfmqError(f"layers must be a sequence of LayerRule, got {value!r}")
    rules = []
    for item in value:
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"pattern", "w_bits", "a_bits"})
            if unknown or "pattern" not in item:
                raise TfmqError(f"a layer rule is an object of pattern, w_bits and a_bits; got {item!r}")
            item = LayerRule(**item)
        if not isinstance(item, LayerRule):
            raise TfmqError(f"layers must be a sequence of LayerRule, got {value!r}")
        rules.append(item)
    return tuple(rules)


@dataclass(frozen=True)
class QuantConfig:
    """What every method shares; bit widths of None mean full precision. Use a method's subclass.

    `layers`: per-layer rules (LayerRule), by default the first and last layer kept in full precision, as
    the Q-Diffusion and TFMQ-DM papers do (`FIRST_AND_LAST_LAYERS`: a UNet's, a DiT's, PixArt's).
    Activation ranges are observed on `act_samples_per_step` samples of every sampling step (spread over
    its samples, so both branches of a guided set), run through the model `batch_size` at a time.

    Finite-set calibration (FSC, `timestep_table`) gives the activation quantizers in `fsc_scope` one
    range per sampling timestep (None: the method's default). Each step's range is initialised (by
    `act_init`) on `fsc_init_samples` of its samples (spread over them), then follows the batch min/max of
    all that step's samples with momentum `fsc_momentum`, as the authors' scripts do; `fsc_momentum=None`
    instead takes the range of everything the step saw: the paper's plain per-timestep calibration. FSC is
    only calibration, so every method may use it.

    `train_timesteps` (the model's `num_train_timesteps`) makes the model schedule-free: its timestep tables
    and temporal caches get a row for every training timestep, so it samples with any scheduler and step
    count. The calibrated timesteps keep their own FSC ranges and the other rows are filled by `fsc_fill`:
    "linear" interpolation in t between the calibrated rows around them, or the "nearest" one's. None (the
    default) serves the calibration's schedule only.

    `output_correction`: after the method, measure the mean output error against full precision of every
    calibrated step, per output channel, over `output_correction_samples` samples of the step (None: all),
    and take it off the model's output at that step (`tfmq.quant.output_correction`): the error every
    sample of a step shares, which the sampler would otherwise add up along the trajectory. None: the
    method's default (`default_output_correction`: on for tfmq's `auto` preset).
    """

    method: ClassVar[str] = ""

    w_bits: int | None = 4
    a_bits: int | None = 8
    weight_init: str = "mse"
    act_init: str = "mse"
    layers: tuple[LayerRule, ...] = tuple(LayerRule.full_precision(name) for name in FIRST_AND_LAST_LAYERS)
    quantize_attention: bool = True
    softmax_bits: int | None = None
    split_shortcut: bool = True
    act_samples_per_step: int = 16
    batch_size: int = 64
    fsc_scope: str | None = None
    fsc_momentum: float | None = 0.95
    fsc_init_samples: int = 16
    train_timesteps: int | None = None
    fsc_fill: str = "linear"
    output_correction: bool | None = None
    output_correction_samples: int | None = 8

    def __init_subclass__(cls, *, method: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            if not isinstance(method, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", method):
                raise TfmqError(f"a method name is lower-case letters, digits, '-' or '_'; got {method!r}")
            if method in CONFIG_TYPES and CONFIG_TYPES[method].__qualname__ != cls.__qualname__:
                raise TfmqError(f"method {method!r} is already the name of {CONFIG_TYPES[method].__qualname__}")
            cls.method = method
            CONFIG_TYPES[method] = cls

    def __post_init__(self) -> None:
        if not type(self).method:
            raise TfmqError(f"{type(self).__name__} names no method: use one of "
                            f"{', '.join(t.__name__ for t in CONFIG_TYPES.values())}")
        _check_bits("w_bits", self.w_bits, WEIGHT_BITS)
        _check_bits("a_bits", self.a_bits, ACTIVATION_BITS)
        _check_bits("softmax_bits", self.softmax_bits, SOFTMAX_BITS)
        _check_choice("weight_init", self.weight_init, RANGE_INITS)
        _check_choice("act_init", self.act_init, RANGE_INITS)
        _check_flag("quantize_attention", self.quantize_attention)
        _check_flag("split_shortcut", self.split_shortcut)
        _check_count("act_samples_per_step", self.act_samples_per_step, 1, optional=False)
        _check_count("batch_size", self.batch_size, 1, optional=False)
        # A frozen config holds tuples (JSON gives lists), so it stays hashable and immutable.
        object.__setattr__(self, "layers", _layer_rules(self.layers))
        if self.fsc_scope is None:
            object.__setattr__(self, "fsc_scope", self.default_fsc_scope())
        _check_choice("fsc_scope", self.fsc_scope, FSC_SCOPES)
        if self.fsc_scope != "none" and self.a_bits is None:
            raise TfmqError(f"fsc_scope={self.fsc_scope!r} calibrates activation ranges, but a_bits is None")
        momentum = self.fsc_momentum
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0 <= momentum < 1):
            raise TfmqError(f"fsc_momentum must be a number in [0, 1) or None, got {momentum!r}")
        _check_count("fsc_init_samples", self.fsc_init_samples, 1, optional=False)
        _check_count("train_timesteps", self.train_timesteps, 2)
        _check_choice("fsc_fill", self.fsc_fill, FSC_FILLS)
        if self.output_correction is None:
            object.__setattr__(self, "output_correction", self.default_output_correction())
        _check_flag("output_correction", self.output_correction)
        _check_count("output_correction_samples", self.output_correction_samples, 1)

    def default_fsc_scope(self) -> str:
        """The FSC scope of `fsc_scope=None`."""
        return "none"

    def default_output_correction(self) -> bool:
        """The output correction of `output_correction=None`."""
        return False

    def check_model(self, model: Any) -> None:
        """Refuse, before any calibration work, a model this config cannot quantize (a TfmqError): FSC's
        temporal scope needs the model's Temporal Information Block."""
        if self.fsc_scope == "temporal":
            _temporal_information_block(model)

    def layer_bits(self, name: str) -> LayerBits:
        """The bit widths of the layer (or attention) `name` under the rules, in order."""
        w_bits, a_bits, matched = self.w_bits, self.a_bits, False
        for rule in self.layers:
            if rule.matches(name):
                matched = True
                w_bits = w_bits if rule.w_bits == INHERIT else rule.w_bits
                a_bits = a_bits if rule.a_bits == INHERIT else rule.a_bits
        return LayerBits(w_bits, a_bits, matched and w_bits is None and a_bits is None)

    def summary(self) -> dict[str, Any]:
        """The columns of a report row."""
        return {"method": self.method, "W": self.w_bits or "fp", "A": self.a_bits or "fp", "preset": "-",
                "FSC": self.fsc_scope}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, the method's name first."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values["layers"] = [rule.to_dict() for rule in self.layers]
        return {"method": self.method, **values}

    @staticmethod
    def from_dict(values: dict[str, Any]) -> QuantConfig:
        """Inverse of `to_dict`: the config type of `values["method"]`; missing keys take its defaults."""
        return config_for(values.get("method"), {key: value for key, value in values.items() if key != "method"})


def methods_with_field(name: str) -> list[str]:
    """The methods whose config has the field `name`."""
    return [method for method, kind in CONFIG_TYPES.items() if name in {field.name for field in dataclasses.fields(kind)}]


def config_for(method: Any, fields: dict[str, Any]) -> QuantConfig:
    """The config of method `method` with `fields`; a field of another method, or of none, is an error naming it."""
    if method not in CONFIG_TYPES:
        raise TfmqError(f"method must be one of {', '.join(CONFIG_TYPES)}; got {method!r}")
    config_type = CONFIG_TYPES[method]
    for name in fields:
        if method not in (owners := methods_with_field(name)):
            where = f"a setting of method {', '.join(owners)}" if owners else "not a setting of any method"
            raise TfmqError(f"{name} is {where}, not of {method!r} ({config_type.__name__})")
    return config_type(**fields)


@dataclass(frozen=True)
class RTNConfig(QuantConfig, method="rtn"):
    """Round-to-nearest: weights on their min-max or MSE grid, activation ranges from the calibration data."""


@dataclass(frozen=True)
class QDiffusionConfig(QuantConfig, method="qdiff"):
    """Q-Diffusion: BRECQ block reconstruction on time-step-aware calibration data.

    `recon_preset` ("fast", "balanced", "auto" or "paper", see RECON_PRESETS) gives iteration counts, batch size and
    learning rates; each `recon_*` field that is not None overrides its preset value (`recon_rounding_stop`:
    True for the held-out checks that end a unit's rounding early, `RoundingStop()`, False for none). With FSC
    over every activation (`fsc_scope="all"`) the tables replace the ranges LSQ would learn, so no LSQ step
    runs, as in the authors' scripts.
    """

    # the method's own reconstruction values under a preset, where they differ from RECON_PRESETS'
    block_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    recon_preset: str = "fast"
    recon_weight_iters: int | None = None
    recon_act_iters: int | None = None
    recon_batch_size: int | None = None
    recon_weight_lr: float | None = None
    recon_act_lr: float | None = None
    recon_rounding_start: str | None = None
    recon_rounding_stop: bool | None = None
    memory_budget_mb: float = 2048.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("recon_preset", self.recon_preset, tuple(RECON_PRESETS))
        _check_count("recon_weight_iters", self.recon_weight_iters, 0)
        _check_count("recon_act_iters", self.recon_act_iters, 0)
        _check_count("recon_batch_size", self.recon_batch_size, 1)
        _check_number("recon_weight_lr", self.recon_weight_lr, optional=True)
        _check_number("recon_act_lr", self.recon_act_lr, optional=True)
        if self.recon_rounding_start is not None:
            _check_choice("recon_rounding_start", self.recon_rounding_start, ROUNDING_STARTS)
        if self.recon_rounding_stop is not None:
            _check_flag("recon_rounding_stop", self.recon_rounding_stop)
        _check_number("memory_budget_mb", self.memory_budget_mb, allow_zero=True)

    @property
    def reconstruction(self) -> ReconstructionSettings:
        """The reconstruction settings: the preset's (with the method's own values under it, `block_presets`),
        the explicit fields taking precedence."""
        preset = {**RECON_PRESETS[self.recon_preset], **self.block_presets.get(self.recon_preset, {})}
        explicit = {"weight_iters": self.recon_weight_iters, "act_iters": self.recon_act_iters,
                    "batch_size": self.recon_batch_size, "weight_lr": self.recon_weight_lr,
                    "act_lr": self.recon_act_lr}
        values = {key: preset[key] if value is None else value for key, value in explicit.items()}
        stop = preset.get("rounding_stop")
        if self.recon_rounding_stop is not None:
            stop = RoundingStop() if self.recon_rounding_stop else None
        return ReconstructionSettings(
            weight_iters=values["weight_iters"],
            act_iters=0 if self.fsc_scope == "all" else values["act_iters"],
            batch_size=values["batch_size"], weight_lr=float(values["weight_lr"]),
            act_lr=float(values["act_lr"]), memory_budget_mb=float(self.memory_budget_mb),
            rounding_stop=stop, rounding_start=self.recon_rounding_start or preset.get("rounding_start", "nearest"),
        )

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "preset": self.recon_preset}


@dataclass(frozen=True)
class TFMQConfig(QDiffusionConfig, method="tfmq"):
    """TFMQ-DM: Q-Diffusion's reconstruction with the temporal features kept apart.

    `tiar` reconstructs the Temporal Information Block as one unit against the temporal features, before the
    other units (off: its linears are learnt inside their blocks, as in qdiff). FSC defaults to the temporal
    scope when activations are quantized, except with the `auto` preset. `temporal_cache` (journal version)
    replaces each residual block's temporal feature by its full-precision value at every scheduled timestep,
    quantized to `a_bits`, so the TIB leaves the sampling loop; `temporal_selection` measures per block the
    error of that cache and of the TIB path and keeps the better one, so it needs `temporal_cache`.
    `tiar_weight_iters`, `tiar_batch_size` and `tiar_weight_lr` set TIAR's AdaRound apart from the blocks'
    (None: the preset's TIAR value, `TIAR_PRESETS`, else the blocks'): its one unit is image-free and small, so
    longer or full-batch TIAR costs little (what it changed: README, "Why tfmq `auto` swings between
    calibration sets"). The preset defaults to `auto`, measured closer to full precision than `fast` on every
    shipped model for about twice its time (README, "Calibration cost").
    """

    block_presets: ClassVar[dict[str, dict[str, Any]]] = TFMQ_BLOCK_PRESETS
    recon_preset: str = "auto"
    tiar: bool = True
    temporal_cache: bool = False
    temporal_selection: bool = False
    tiar_weight_iters: int | None = None
    tiar_batch_size: int | None = None
    tiar_weight_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_flag("tiar", self.tiar)
        _check_flag("temporal_cache", self.temporal_cache)
        _check_flag("temporal_selection", self.temporal_selection)
        _check_count("tiar_weight_iters", self.tiar_weight_iters, 0)
        _check_count("tiar_batch_size", self.tiar_batch_size, 1)
        _check_number("tiar_weight_lr", self.tiar_weight_lr, optional=True)
        if self.temporal_selection and not self.temporal_cache:
            raise TfmqError("temporal_selection=True chooses per block between the TIB path and the temporal "
                            "cache: it needs temporal_cache=True")

    @property
    def tiar_reconstruction(self) -> ReconstructionSettings:
        """The reconstruction settings of TIAR's unit: the blocks', with the preset's TIAR values
        (`TIAR_PRESETS`) and then the `tiar_*` fields that are set."""
        explicit = {"weight_iters": self.tiar_weight_iters, "batch_size": self.tiar_batch_size,
                    "weight_lr": self.tiar_weight_lr}
        values = {**TIAR_PRESETS.get(self.recon_preset, {}),
                  **{key: value for key, value in explicit.items() if value is not None}}
        return dataclasses.replace(self.reconstruction, **values)

    def default_fsc_scope(self) -> str:
        """Temporal, but none without quantized activations and with the `auto` preset: there FSC made no
        difference on the UNets and cost the diffusion transformer (README, "Calibration cost")."""
        return "none" if self.a_bits is None or self.recon_preset == "auto" else "temporal"

    def default_output_correction(self) -> bool:
        """On with the `auto` preset: its shorter reconstruction leaves a per-step error that the images
        share, and the correction takes it off (README, "Calibration cost")."""
        return self.recon_preset == "auto"

    def check_model(self, model: Any) -> None:
        """Also refuse a model without a TIB for TIAR, and one whose temporal features a cache cannot hold."""
        super().check_model(model)
        if self.tiar or self.temporal_cache:
            tib = _temporal_information_block(model)
            if self.temporal_cache:
                from tfmq.quant.tib import check_temporal_cache_supported

                _as_user_error(check_temporal_cache_supported, model, tib)


def _as_user_error(check: Any, *args: Any) -> Any:
    try:
        return check(*args)
    except ValueError as error:
        raise TfmqError(str(error)) from error


def _temporal_information_block(model: Any) -> Any:
    """`find_tib(model)`, its refusal as a TfmqError (imported here: the config types stay free of torch)."""
    from tfmq.quant.tib import find_tib

    return _as_user_error(find_tib, model)
