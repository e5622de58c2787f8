"""Load-free counts of the work of one training step: what it does, not how long it takes.

Under :class:`Counting`, a step records

* ``forwards``: calls of the model (a forward pre-hook); ``backwards``: backward traversals that reach the logits
  (a gradient hook on them: every backward, SMART's ascent gradient included); ``weight_backwards``: gradients
  computed for the word-embedding weight (a hook on ``get_input_embeddings().weight``: the backward passes that go
  all the way down; a snippet that embeds once and feeds ``inputs_embeds`` to every pass reaches it once);
* ``flops``: matrix-multiply FLOPs, forward and backward (``torch.utils.flop_counter.FlopCounterMode``);
* ``ops`` and ``bytes``: every ATen operator called (a ``TorchDispatchMode``) and the bytes it wrote (its fresh
  results and the arguments it changed in place; views write nothing: :func:`written`), in all and per operator;
  ``foreach``: the ``_foreach_*`` calls; ``copies``: bytes written by copies (``clone``, ``copy_``, ``_to_copy``,
  out-of-place ``_foreach_mul``);
* ``py_calls``: Python function calls inside ``lightning_adv`` (``sys.setprofile``): the interpreter's share.

Two versions of the engine that do the same passes and write the same bytes cost the same on any machine, up to
the Python overhead; ``X_flops = (F_attack - F_plain) / F_fwd+bwd`` is the floor that the timed X approaches when
the step is compute-bound.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

COPY_OPS = {"clone", "copy_", "_to_copy", "_foreach_mul"}


def _nbytes(value: Any) -> int:
    flat, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def written(func: Any, args: Any, kwargs: Any, out: Any) -> int:
    """Bytes an operator wrote: its mutated arguments (in place, ``_foreach_*_`` included) and its fresh results;
    results that alias an input (views, the ``self`` of an in-place operator) are not counted again."""
    schema = func._schema
    n = 0
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            n += _nbytes(args[i] if i < len(args) else kwargs.get(arg.name))
    returns = schema.returns
    pairs = [(returns[0], out)] if len(returns) == 1 else list(zip(returns, out if isinstance(out, (tuple, list)) else ()))
    return n + sum(_nbytes(value) for ret, value in pairs if ret.alias_info is None)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Dict[str, int] = collections.Counter()
        self.bytes: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        self.bytes[name] += written(func, args, kwargs, out)
        return out


class Counting:
    """Counts the work done while entered (see the module's docstring); :attr:`result` after exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.result: Optional[Dict[str, Any]] = None

    def __enter__(self) -> "Counting":
        from torch.utils.flop_counter import FlopCounterMode

        self._forwards, self._backwards, self._py = 0, 0, 0

        def pre(module: nn.Module, args: Any) -> None:
            self._forwards += 1

        def post(module: nn.Module, args: Any, output: Any) -> None:
            logits = getattr(output, "logits", None)
            if isinstance(logits, torch.Tensor) and logits.requires_grad:
                logits.register_hook(self._on_backward)

        self._handles = [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        self._weight_backwards = 0
        getter = getattr(self.model, "get_input_embeddings", None)
        weight = getattr(getter() if callable(getter) else None, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            self._handles.append(weight.register_hook(self._on_weight))
        self._flops = FlopCounterMode(display=False)
        self._ops = _Ops()
        self._flops.__enter__()
        self._ops.__enter__()
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def _on_backward(self, grad: torch.Tensor) -> None:
        self._backwards += 1

    def _on_weight(self, grad: torch.Tensor) -> None:
        self._weight_backwards += 1

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and "lightning_adv" in frame.f_code.co_filename:
            self._py += 1

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(self._previous)
        self._ops.__exit__(*exc)
        self._flops.__exit__(*exc)
        for h in self._handles:
            h.remove()
        calls, nbytes = dict(self._ops.calls), dict(self._ops.bytes)
        self.result = dict(
            forwards=self._forwards, backwards=self._backwards,
            weight_backwards=self._weight_backwards,
            flops=int(self._flops.get_total_flops()),
            ops=sum(calls.values()), bytes=sum(nbytes.values()),
            foreach=sum(n for k, n in calls.items() if k.startswith("_foreach_")),
            copies=sum(n for k, n in nbytes.items() if k in COPY_OPS),
            py_calls=self._py, per_op={k: [calls[k], nbytes[k]] for k in sorted(calls)},
        )


def count_step(model: nn.Module, step: Callable[[], None], warmup: int = 1) -> Dict[str, Any]:
    """The counts of one call of ``step`` after ``warmup`` uncounted ones (the optimizer's state exists)."""
    for _ in range(warmup):
        step()
    with Counting(model) as counting:
        step()
    assert counting.result is not None
    return counting.result


def x_flops(counts: Dict[str, Dict[str, Any]], variant: str, plain: str = "plain") -> float:
    """``(F_variant - F_plain) / F_fwd_bwd``: the extra matrix-multiply work in units of one forward+backward."""
    return (counts[variant]["flops"] - counts[plain]["flops"]) / counts["fwd_bwd"]["flops"]
