"""The checks a checkpoint's JSON passes before anything is built from it: each raises ValueError naming
the first entry of a wrong type or value, which loading reports as one line."""

from __future__ import annotations


def expect(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON's true would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: object) -> str:
    """A value as a message shows it: its repr, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
