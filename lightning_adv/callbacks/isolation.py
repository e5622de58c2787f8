"""Making the adversarial re-run of ``training_step`` invisible: no logging, metrics and buffers restored."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, List, Tuple

import torch
from torch import nn


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def silenced_logging(module: nn.Module) -> Iterator[None]:
    """Shadow ``module.log`` and ``module.log_dict`` with no-ops on the instance, then remove the shadows."""
    object.__setattr__(module, "log", _no_log)
    object.__setattr__(module, "log_dict", _no_log)
    try:
        yield
    finally:
        object.__delattr__(module, "log")
        object.__delattr__(module, "log_dict")


def _metric_type() -> Any:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics ships with Lightning
        return None
    return Metric


class StateGuard:
    """Snapshots what a forward may change in a module (torchmetrics states, buffers) and restores it.

    The lists of metrics and buffers are found once, at construction; a module without metrics or
    buffers costs nothing per step. Metric states are restored into the original objects (in place, and
    re-attached if ``update`` rebound them), so compute groups that share state tensors keep sharing.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> guard = StateGuard(bn)
        >>> with guard.preserved():
        ...     _ = bn(torch.randn(8, 3))
        >>> int(bn.num_batches_tracked), bn.running_mean.tolist()
        (0, [0.0, 0.0, 0.0])
    """

    def __init__(self, module: nn.Module) -> None:
        metric = _metric_type()
        self.metrics = [m for m in module.modules() if metric is not None and isinstance(m, metric)]
        metric_buffers = {id(b) for m in self.metrics for b in m.buffers()}
        self.buffers = [b for b in module.buffers() if id(b) not in metric_buffers]

    @contextmanager
    def preserved(self) -> Iterator[None]:
        buffers = [b.detach().clone() for b in self.buffers]
        metrics = [_snapshot(m) for m in self.metrics]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(self.buffers, buffers):
                    b.copy_(saved)
            for m, snap in zip(self.metrics, metrics):
                _restore(m, snap)


_Snapshot = Tuple[List[Tuple[str, Any, Any]], Any, Any, Any]


def _snapshot(metric: Any) -> _Snapshot:
    states = []
    for name in metric._defaults:
        value = getattr(metric, name)
        saved = value.detach().clone() if isinstance(value, torch.Tensor) else list(value)
        states.append((name, value, saved))
    return states, metric._update_count, metric._forward_cache, metric._computed


def _restore(metric: Any, snapshot: _Snapshot) -> None:
    states, update_count, forward_cache, computed = snapshot
    with torch.no_grad():
        for name, original, saved in states:
            if isinstance(original, torch.Tensor):
                original.copy_(saved)
            else:
                original[:] = saved
            setattr(metric, name, original)
    metric._update_count = update_count
    metric._forward_cache = forward_cache
    metric._computed = computed
