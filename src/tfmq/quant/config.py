"""What to quantize and how: one frozen object that travels with a quantized model as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

METHODS = ("rtn", "qdiff", "tfmq")
RANGE_INITS = ("mse", "minmax")
WEIGHT_BITS = range(2, 9)
ACTIVATION_BITS = range(4, 17)
SOFTMAX_BITS = range(2, 17)


def _check_bits(name: str, value: Any, allowed: range) -> None:
    # bool is an int in Python: reject it explicitly so `w_bits=True` is not read as 1 bit.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(
            f"{name} must be an int in {allowed.start}..{allowed.stop - 1} or None, got {value!r}"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """A quantization recipe; bit widths of None mean full precision.

    `keep_fp` holds glob patterns (fnmatch) over qualified module names; a module whose name, or the
    name of one of its parents, matches is left in full precision. The default keeps the first and
    last layer, as the Q-Diffusion and TFMQ-DM papers do.
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

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_bits("w_bits", self.w_bits, WEIGHT_BITS)
        _check_bits("a_bits", self.a_bits, ACTIVATION_BITS)
        _check_bits("softmax_bits", self.softmax_bits, SOFTMAX_BITS)
        _check_choice("weight_init", self.weight_init, RANGE_INITS)
        _check_choice("act_init", self.act_init, RANGE_INITS)
        _check_flag("quantize_attention", self.quantize_attention)
        _check_flag("split_shortcut", self.split_shortcut)
        if isinstance(self.keep_fp, str) or not all(isinstance(p, str) for p in self.keep_fp):
            raise ValueError(f"keep_fp must be a sequence of glob patterns (str), got {self.keep_fp!r}")
        # JSON gives lists; a frozen config must hold a tuple to stay hashable and immutable.
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))

    @property
    def attention_probs_bits(self) -> int | None:
        """Bit width of the softmax output: its own setting, else the activation bit width."""
        return self.a_bits if self.softmax_bits is None else self.softmax_bits

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
            raise ValueError(f"unknown QuantConfig field(s): {', '.join(unknown)}")
        return cls(**values)
