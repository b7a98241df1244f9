"""What to quantize and how: one frozen object that travels with a quantized model as JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from tfmq.errors import TfmqError

METHODS = ("rtn", "qdiff", "tfmq")
RANGE_INITS = ("mse", "minmax")
WEIGHT_BITS = range(2, 9)
ACTIVATION_BITS = range(4, 17)
SOFTMAX_BITS = range(2, 17)
# Which activation quantizers get one row of parameters per sampling timestep (finite-set calibration):
# none; those reading the Temporal Information Block's features (the paper); every one (the authors' scripts).
FSC_SCOPES = ("none", "temporal", "all")


@dataclass(frozen=True)
class ReconstructionSettings:
    """How long and how fast each reconstruction unit is optimised (resolved from a QuantConfig).

    `weight_iters` AdaRound steps, then `act_iters` LSQ steps on the activation step sizes, each on
    random batches of `batch_size` cached calibration samples. Cached unit inputs and targets larger
    than `memory_budget_mb` go to a temporary folder on disk instead of memory.
    """

    weight_iters: int
    act_iters: int
    batch_size: int
    weight_lr: float
    act_lr: float
    memory_budget_mb: float


# "paper": the Q-Diffusion / TFMQ-DM scripts (20k AdaRound and 5k LSQ steps a unit, batch 32, Adam at 1e-3
# on the rounding and 4e-5 on the step sizes). "fast": for a CPU, a hundredth of the steps, the rounding at
# ten times the learning rate (V lives in logit space: 200 steps of 1e-2 can flip a decision). The step
# sizes keep 4e-5: Adam moves every step by about lr whatever its size, and 50 steps of 4e-4 already
# wreck a softmax step of 1/255 (measured on the tiny text UNet: its error doubled). "balanced": fast's
# settings with ten times its rounding steps, the length at which the shipped models' W4A8 images came
# 3-13 dB closer to FP than with "fast" (README, "Reconstruction length"), for 3-5x the time.
RECON_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"weight_iters": 20_000, "act_iters": 5_000, "batch_size": 32, "weight_lr": 1e-3, "act_lr": 4e-5},
    "balanced": {"weight_iters": 2_000, "act_iters": 50, "batch_size": 32, "weight_lr": 1e-2, "act_lr": 4e-5},
    "fast": {"weight_iters": 200, "act_iters": 50, "batch_size": 32, "weight_lr": 1e-2, "act_lr": 4e-5},
}


def _check_bits(name: str, value: Any, allowed: range) -> None:
    # bool is an int in Python: reject it explicitly so `w_bits=True` is not read as 1 bit.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise TfmqError(
            f"{name} must be an int in {allowed.start}..{allowed.stop - 1} or None, got {value!r}"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TfmqError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TfmqError(f"{name} must be True or False, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TfmqError(f"{name} must be an int >= {minimum} or None, got {value!r}")


def _check_number(name: str, value: Any, *, allow_zero: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or value < 0 or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise TfmqError(f"{name} must be a finite number {bound}{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """A quantization recipe; bit widths of None mean full precision.

    `keep_fp` holds glob patterns (fnmatch) over qualified module names; a module whose name, or the
    name of one of its parents, matches is left in full precision. The default keeps the first and
    last layer, as the Q-Diffusion and TFMQ-DM papers do.

    Reconstruction (qdiff, tfmq): `recon_preset` ("paper", "balanced" or "fast", see RECON_PRESETS) gives
    iteration counts, batch size and learning rates; each `recon_*` field that is not None overrides its
    preset value. `reconstruction` holds the resolved values.

    Finite-set calibration (FSC, `timestep_table`) gives the activation quantizers in `fsc_scope` one
    range per sampling timestep. Each step's range is initialised (by `act_init`) on its first
    `fsc_init_samples` samples, then follows the batch min/max of all that step's samples with momentum
    `fsc_momentum`, as the authors' scripts do; `fsc_momentum=None` instead takes the range (by
    `act_init`) of everything the step saw: the paper's plain per-timestep calibration. FSC is only
    calibration, so every method may use it (rtn or qdiff with FSC isolate what the tables bring). With
    scope "all" the tables replace every activation range, so reconstruction learns no activation
    step (LSQ), as in the authors' scripts.

    TFMQ only (other methods must leave them at their defaults): `tiar` reconstructs the Temporal
    Information Block as one unit against the temporal features, before the other units (off: its
    linears are learnt inside their blocks, as in qdiff). `temporal_cache` (journal version) replaces
    each residual block's temporal feature by its full-precision value at every scheduled timestep,
    quantized to `a_bits`, so the TIB leaves the sampling loop; `temporal_selection` measures per block
    the error of that cache and of the TIB path and keeps the better one, so it needs `temporal_cache`.
    """

    method: str = "tfmq"
    w_bits: int | None = 4
    a_bits: int | None = 8
    weight_init: str = "mse"
    act_init: str = "mse"
    keep_fp: tuple[str, ...] = ("conv_in", "conv_out")
    quantize_attention: bool = True
    softmax_bits: int | None = None
    split_shortcut: bool = True
    recon_preset: str = "paper"
    recon_weight_iters: int | None = None
    recon_act_iters: int | None = None
    recon_batch_size: int | None = None
    recon_weight_lr: float | None = None
    recon_act_lr: float | None = None
    memory_budget_mb: float = 2048.0
    fsc_scope: str = "none"
    fsc_momentum: float | None = 0.95
    fsc_init_samples: int = 16
    tiar: bool = True
    temporal_cache: bool = False
    temporal_selection: bool = False

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_bits("w_bits", self.w_bits, WEIGHT_BITS)
        _check_bits("a_bits", self.a_bits, ACTIVATION_BITS)
        _check_bits("softmax_bits", self.softmax_bits, SOFTMAX_BITS)
        _check_choice("weight_init", self.weight_init, RANGE_INITS)
        _check_choice("act_init", self.act_init, RANGE_INITS)
        _check_flag("quantize_attention", self.quantize_attention)
        _check_flag("split_shortcut", self.split_shortcut)
        _check_choice("fsc_scope", self.fsc_scope, FSC_SCOPES)
        if self.fsc_scope != "none" and self.a_bits is None:
            raise TfmqError(f"fsc_scope={self.fsc_scope!r} calibrates activation ranges, but a_bits is None")
        if self.fsc_momentum is not None and not (_is_number(self.fsc_momentum) and 0 <= self.fsc_momentum < 1):
            raise TfmqError(f"fsc_momentum must be a number in [0, 1) or None, got {self.fsc_momentum!r}")
        if isinstance(self.fsc_init_samples, bool) or not isinstance(self.fsc_init_samples, int) \
                or self.fsc_init_samples < 1:
            raise TfmqError(f"fsc_init_samples must be a positive int, got {self.fsc_init_samples!r}")
        _check_flag("tiar", self.tiar)
        _check_flag("temporal_cache", self.temporal_cache)
        _check_flag("temporal_selection", self.temporal_selection)
        if self.method != "tfmq":
            changed = [f"{name}={value!r}" for name, value, default in (
                ("tiar", self.tiar, True), ("temporal_cache", self.temporal_cache, False),
                ("temporal_selection", self.temporal_selection, False)) if value != default]
            if changed:
                raise TfmqError(f"{', '.join(changed)} only apply to method 'tfmq', not {self.method!r}")
        if self.temporal_selection and not self.temporal_cache:
            raise TfmqError("temporal_selection=True chooses per block between the TIB path and the temporal "
                             "cache: it needs temporal_cache=True")
        _check_choice("recon_preset", self.recon_preset, tuple(RECON_PRESETS))
        _check_count("recon_weight_iters", self.recon_weight_iters, 0)
        _check_count("recon_act_iters", self.recon_act_iters, 0)
        _check_count("recon_batch_size", self.recon_batch_size, 1)
        _check_number("recon_weight_lr", self.recon_weight_lr, optional=True)
        _check_number("recon_act_lr", self.recon_act_lr, optional=True)
        _check_number("memory_budget_mb", self.memory_budget_mb, allow_zero=True)
        if isinstance(self.keep_fp, str) or not all(isinstance(p, str) for p in self.keep_fp):
            raise TfmqError(f"keep_fp must be a sequence of glob patterns (str), got {self.keep_fp!r}")
        # JSON gives lists; a frozen config must hold a tuple to stay hashable and immutable.
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))

    @property
    def attention_probs_bits(self) -> int | None:
        """Bit width of the softmax output: its own setting, else the activation bit width."""
        return self.a_bits if self.softmax_bits is None else self.softmax_bits

    @property
    def reconstruction(self) -> ReconstructionSettings:
        """The reconstruction settings: the preset's, with the explicit fields taking precedence."""
        preset = RECON_PRESETS[self.recon_preset]
        explicit = {"weight_iters": self.recon_weight_iters, "act_iters": self.recon_act_iters,
                    "batch_size": self.recon_batch_size, "weight_lr": self.recon_weight_lr,
                    "act_lr": self.recon_act_lr}
        values = {key: preset[key] if value is None else value for key, value in explicit.items()}
        return ReconstructionSettings(
            weight_iters=values["weight_iters"], act_iters=values["act_iters"], batch_size=values["batch_size"],
            weight_lr=float(values["weight_lr"]), act_lr=float(values["act_lr"]),
            memory_budget_mb=float(self.memory_budget_mb),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (keep_fp as a list)."""
        values = dataclasses.asdict(self)
        values["keep_fp"] = list(self.keep_fp)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantConfig:
        """Inverse of `to_dict`; unknown keys are an error, missing keys take their defaults."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TfmqError(f"unknown QuantConfig field(s): {', '.join(unknown)}")
        return cls(**values)
