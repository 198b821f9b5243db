"""Argument checks shared by the optimizer, routing, the monitors and the examples.

Each check returns the value it accepted (normalised where noted) or raises ``ValueError`` naming
the argument, where it was given (``where``, e.g. ``"Muon"`` or ``"StableRankMonitor"``) and what
was expected, so that every bad input reads the same way.

Example:
    >>> check_positive_int(3, "every_n_steps", "StableRankMonitor")
    3
    >>> check_number(0.95, "momentum", "Muon", low=0, high=1, high_open=True)
    0.95
    >>> check_number(1.0, "momentum", "Muon", low=0, high=1, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: Muon: momentum must be a number in [0, 1), got 1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_number",
    "check_patterns",
    "check_positive_int",
    "is_number",
]


def is_number(value: Any) -> bool:
    """A finite real number (int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_int(value: Any, arg: str, where: str, minimum: int = 1) -> int:
    """``value`` if it is an integer ``>= minimum`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {arg} must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(
    value: Any,
    arg: str,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> float:
    """``value`` if it is a finite number in the stated range (``low``/``high`` None: unbounded).

    ``why`` is appended to the message, e.g. ``" (a zero row would divide 0 by 0)"``.
    """
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{where}: {arg} must be {_describe(low, high, low_open, high_open)}{why}, got {value!r}")
    return value


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_choice(value: Any, arg: str, where: str, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared with ``==``, so a bool is not taken for 1)."""
    options = tuple(choices)
    if not any(value == c and type(value) is type(c) for c in options):
        raise ValueError(f"{where}: {arg} must be one of {options}, got {value!r}")
    return value


def check_bool(value: Any, arg: str, where: str) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {arg} must be True or False, got {value!r}")
    return value


def check_patterns(value: Sequence[str] | None, arg: str, where: str) -> tuple[str, ...] | None:
    """``value`` as a tuple of fnmatch patterns (None stays None); a single string is refused."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {arg} must be a list of fnmatch patterns (strings), got {value!r}")
    return tuple(value)
