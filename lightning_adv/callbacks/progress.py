"""How lightning_adv's metrics look on the progress bar: small values readable, long names short.

Lightning's bars print floats with three decimals (``RichProgressBar``: ``.3f``), so a divergence of ``2e-6`` shows as
``0.000``. Both bars take what they print from their public ``get_metrics(trainer, pl_module)`` (the documented place
to change it); while a lightning_adv callback runs, the bar's ``get_metrics`` is wrapped (on the instance, removed at
``teardown``) so that:

* a value of a lightning_adv key (``adv/...``, ``RobustAccuracy``'s) that is not 0 and under 0.01 in absolute value
  is shown in scientific notation with three significant digits (``1.86e-09``), as a string, which both bars print
  as it is;
* a key registered with :func:`show_as` is shown under its short name (``val_robust_acc@0.125`` -> ``val_rob@0.125``,
  Lightning's ``/dataloader_idx_N`` suffix kept).

Only the display changes: ``trainer.progress_bar_metrics``, ``callback_metrics`` and the loggers keep the values and
their full names. The user's own keys are left as the bar shows them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

SMALL = 0.01
"""Values below this (in absolute value, and not 0) are shown in scientific notation."""

_PREFIXES = ("adv/",)


def readable(value: Any) -> Any:
    """``value`` as the bar should show it: a float ``0 < |value| < 0.01`` as ``"1.86e-09"``, anything else as it is.

    >>> readable(1.86e-09), readable(-2.5e-05), readable(0.25), readable(0.0), readable(3)
    ('1.86e-09', '-2.50e-05', 0.25, 0.0, 3)
    """
    if isinstance(value, float) and value != 0 and math.isfinite(value) and abs(value) < SMALL:
        return f"{value:.2e}"
    return value


class DisplayedMetrics:
    """The wrapped ``get_metrics`` of one progress bar (a picklable callable: a bar may travel to spawned processes).

    Args:
        original: the bar's own ``get_metrics``.
    """

    def __init__(self, original: Callable[[Any, Any], Dict[str, Any]]) -> None:
        self.original = original
        self.short: Dict[str, str] = {}
        """Full key -> the name the bar shows."""

    def __call__(self, trainer: Any, pl_module: Any) -> Dict[str, Any]:
        return self.display(self.original(trainer, pl_module))

    def display(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """The bar's metrics with lightning_adv's small values readable and registered names short.

        >>> shown = DisplayedMetrics(lambda t, m: {})
        >>> shown.short["val_robust_acc@0.125"] = "val_rob@0.125"
        >>> shown.display({"adv/r3f_loss": 1.86e-09, "loss": 1e-5, "val_robust_acc@0.125/dataloader_idx_1": 0.5})
        {'adv/r3f_loss': '1.86e-09', 'loss': 1e-05, 'val_rob@0.125/dataloader_idx_1': 0.5}
        """
        out: Dict[str, Any] = {}
        for key, value in metrics.items():
            base, sep, suffix = key.partition("/dataloader_idx_")
            if base in self.short:
                out[self.short[base] + sep + suffix] = readable(value)
            elif key.startswith(_PREFIXES):
                out[key] = readable(value)
            else:
                out[key] = value
        return out


def _bar(trainer: Any) -> Optional[Any]:
    return getattr(trainer, "progress_bar_callback", None)


def install(trainer: Any) -> Optional[DisplayedMetrics]:
    """Wrap the trainer's progress bar's ``get_metrics`` (once); None without a progress bar."""
    bar = _bar(trainer)
    if bar is None:
        return None
    current = vars(bar).get("get_metrics")
    if isinstance(current, DisplayedMetrics):
        return current
    wrapper = DisplayedMetrics(bar.get_metrics)
    bar.get_metrics = wrapper
    return wrapper


def uninstall(trainer: Any) -> None:
    """Give the progress bar its own ``get_metrics`` back (idempotent)."""
    bar = _bar(trainer)
    if bar is not None and isinstance(vars(bar).get("get_metrics"), DisplayedMetrics):
        del bar.get_metrics


def show_as(trainer: Any, key: str, short: str) -> None:
    """Show ``key`` under the name ``short`` on the trainer's progress bar (a no-op without one)."""
    wrapper = install(trainer)
    if wrapper is not None:
        wrapper.short[key] = short


__all__ = ["DisplayedMetrics", "install", "readable", "show_as", "uninstall"]
