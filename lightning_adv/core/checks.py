"""Argument checks shared by the core methods and the callbacks: each error names the value and the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


def check_non_negative(owner: str, **values: Any) -> None:
    """Raise ``ValueError`` naming the argument when a value is not a finite number >= 0.

    >>> check_non_negative("FGM", epsilon=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: FGM(epsilon=-1.0): epsilon must be a finite number >= 0.
    """
    for name, value in values.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}({name}={value!r}): {name} must be a finite number >= 0.")


def check_int(owner: str, name: str, value: Any, minimum: int, meaning: str = "") -> None:
    """Raise ``ValueError`` naming the argument when ``value`` is not an integer >= ``minimum`` (a Python or numpy
    integer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
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


# -- argument types: plain numbers and strings that validate themselves -------------------------------------------
# Used as type hints of the callbacks' arguments, so that LightningCLI (jsonargparse) reports an out-of-range value
# as a parse error naming the flag (see lightning_adv.callbacks.cli_types); Python itself does not enforce hints, and
# the classes check their arguments at construction as well.


class NonNegativeFloat(float):
    """A finite number >= 0.

    >>> NonNegativeFloat("0.5")
    0.5
    >>> NonNegativeFloat(-1)
    Traceback (most recent call last):
    ...
    ValueError: -1 is not a finite number >= 0
    """

    def __new__(cls, value: Any) -> "NonNegativeFloat":
        number = float(value)
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise ValueError(f"{value!r} is not a finite number >= 0")
        return super().__new__(cls, number)


class PositiveInt(int):
    """An integer >= 1."""

    minimum = 1

    def __new__(cls, value: Any) -> "PositiveInt":
        if isinstance(value, bool) or (isinstance(value, numbers.Real) and not float(value).is_integer()):
            raise ValueError(f"{value!r} is not an integer >= {cls.minimum}")
        number = int(value)
        if number < cls.minimum:
            raise ValueError(f"{value!r} is not an integer >= {cls.minimum}")
        return super().__new__(cls, number)


class NonNegativeInt(PositiveInt):
    """An integer >= 0."""

    minimum = 0


class ParameterPattern(str):
    """A non-empty substring of parameter names (an empty one would match every parameter)."""

    def __new__(cls, value: Any) -> "ParameterPattern":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{value!r} is not a non-empty substring of parameter names")
        return super().__new__(cls, value)


def check_module_path(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is None (find the module) or a non-empty dotted module path."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(
            f"{owner}({name}={value!r}): {name} must be None (found from get_input_embeddings()) or the dotted path "
            "of the input-embedding module, e.g. 'model.bert.embeddings.word_embeddings'."
        )
