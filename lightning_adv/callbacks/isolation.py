"""Making the adversarial re-run of ``training_step`` invisible: no logging, metrics and buffers restored."""

from __future__ import annotations

import copy
import weakref
from collections import UserDict
from collections.abc import Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

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
            # through .data: the copy must not bump the buffer's version counter, or a pending backward that saved
            # the buffer (the clean one, when the guard runs before it; BERT's token_type_ids) would fail
            with torch.no_grad():
                for b, saved in zip(self.buffers, buffers):
                    b.data.copy_(saved)
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


# -- the public "inside an adversarial pass" flag -----------------------------------------------------------------

_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def in_adversarial_pass(module: nn.Module) -> bool:
    """Whether ``module`` is running an adversarial pass (a re-run of its step by lightning_adv) right now.

    Use it in a ``training_step`` with side effects that must happen once per batch::

        if not lightning_adv.in_adversarial_pass(self):
            self.training_step_outputs.append(loss)

    >>> in_adversarial_pass(torch.nn.Linear(1, 1))
    False
    """
    return module in _ACTIVE


@contextmanager
def adversarial_pass(module: nn.Module) -> Iterator[None]:
    """Mark ``module`` as running an adversarial pass (see :func:`in_adversarial_pass`)."""
    _ACTIVE.add(module)
    try:
        yield
    finally:
        _ACTIVE.discard(module)


def copy_containers(batch: Any) -> Any:
    """A copy of the lists, tuples and mappings of ``batch`` (the tensors shared), so that a step that mutates
    its batch (``batch.pop("labels")``) gets it whole in every pass."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, UserDict)) or isinstance(batch, MutableMapping):
        out = copy.copy(batch)
        for key in range(len(out)) if isinstance(out, list) else list(out.keys()):
            out[key] = copy_containers(out[key])
        return out
    if isinstance(batch, tuple):
        items = [copy_containers(x) for x in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, Mapping):
        return {k: copy_containers(v) for k, v in batch.items()}
    return batch


class SideEffects:
    """Notices the public attributes of a module that the adversarial passes changed (a list that grew, a
    counter that moved): the tell-tale of a ``training_step`` with side effects that now run once per pass."""

    _WATCHED = (list, dict, set, int, float)

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.before = self._state()

    def _state(self) -> Dict[str, Any]:
        state = {}
        for name, value in vars(self.module).items():
            if name.startswith("_") or isinstance(value, bool) or not isinstance(value, self._WATCHED):
                continue
            state[name] = len(value) if isinstance(value, (list, dict, set)) else value
        return state

    def changed(self) -> List[str]:
        after = self._state()
        return [name for name, value in self.before.items() if name in after and after[name] != value]
