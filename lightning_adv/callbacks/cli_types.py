"""Teach LightningCLI (jsonargparse) the argument types of the callbacks, so that a value out of range is a parse
error naming the flag and the rule (exit code 2), like a value of the wrong type. A no-op without jsonargparse."""

from __future__ import annotations

from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, ParameterPattern, PositiveInt


def register() -> bool:
    """Register the types with jsonargparse if it is installed; return whether it is."""
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # pragma: no cover - jsonargparse is an optional dependency (the `cli` extra)
        return False
    for kind, base in ((NonNegativeFloat, float), (PositiveInt, int), (NonNegativeInt, int), (ParameterPattern, str)):
        try:
            register_type(kind, base, kind)
        except ValueError:  # registered already
            pass
    return True
