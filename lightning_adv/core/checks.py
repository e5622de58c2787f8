"""Argument checks shared by the core methods and the callbacks: each error names the value and the fix."""

from __future__ import annotations

import math
from typing import Any, Iterable


def check_non_negative(owner: str, **values: Any) -> None:
    """Raise ``ValueError`` naming the argument when a value is not a finite number >= 0.

    >>> check_non_negative("FGM", epsilon=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: FGM(epsilon=-1.0): epsilon must be a finite number >= 0.
    """
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}({name}={value!r}): {name} must be a finite number >= 0.")


def check_int(owner: str, name: str, value: Any, minimum: int, meaning: str = "") -> None:
    """Raise ``ValueError`` naming the argument when ``value`` is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"{owner}({name}={value!r}): {name} must be an integer >= {minimum}{extra}.")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the argument when ``value`` is not one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be one of {', '.join(map(repr, choices))}.")


def check_pattern(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` when a parameter-name pattern is not a non-empty string (``""`` matches everything)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{owner}({name}={value!r}): {name} must be a non-empty substring of parameter names "
            "(an empty one would match every parameter of the model)."
        )
