"""Argument checks shared by moelab's entry points: a wrong value fails at once, naming the argument,
the value and what to give instead, not deep inside a tensor operation."""

from __future__ import annotations

import math
import numbers

__all__ = ["whole", "share"]


def whole(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int if it is a whole number (int or numpy integer, not bool) within the bounds.

    Raises:
        TypeError: a float, string or other non-integer (``6.5``, ``"6"``, ``6.0``).
        ValueError: below ``minimum`` or above ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = f"; pass int({value!r})" if isinstance(value, float) and float(value).is_integer() else ""
        raise TypeError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}){hint}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def share(value, name: str, low: float = 0.0, high: float = 1.0, *, low_open: bool = False,
          high_open: bool = False) -> float:
    """``value`` as a float if it is a finite number within [low, high] (ends open where asked).

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite, or outside the interval (the message shows the interval).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value
