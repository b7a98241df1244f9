"""Checks of the numbers a user hands the samplers: one place, one wording, one error type.

NaN passes every `<` comparison and a float or a bool passes for an int in most arithmetic, so a bare
`value < 0` lets both through to a traceback (or to a silently wrong result) far from the input.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from tfmq.errors import TfmqError


def check_number(name: str, value: object, minimum: float | None = None) -> float:
    """`value` as a float: a finite real number, at least `minimum` when given."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TfmqError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise TfmqError(f"{name} must be >= {minimum:g}, got {value!r}")
    return float(value)


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """`value` as an int: an integer (not a bool or a float), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TfmqError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        wanted = "positive" if minimum == 1 else f">= {minimum}"
        raise TfmqError(f"{name} must be {wanted}, got {value}")
    return int(value)

