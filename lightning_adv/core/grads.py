"""Keeping the gradients of earlier micro-batches aside, so that an attack sees one micro-batch's gradient."""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch


class GradientStash:
    """Moves the gradients already accumulated in ``.grad`` out of the way and puts them back later.

    With gradient accumulation, ``.grad`` holds the sum over earlier micro-batches. An attack must be driven
    by the current micro-batch's own gradient, and AWP must replace only that micro-batch's gradient, so
    the earlier sum is moved aside (the ``.grad`` references are swapped: no copy) before the clean
    backward and merged back (``earlier + current``) before the last backward of the attack.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> (2 * w).sum().backward()            # an earlier micro-batch
        >>> stash = GradientStash([w])
        >>> stash.stash()
        >>> w.grad is None
        True
        >>> (3 * w).sum().backward()            # this micro-batch alone
        >>> w.grad.tolist()
        [3.0, 3.0, 3.0]
        >>> stash.merge()
        >>> w.grad.tolist()
        [5.0, 5.0, 5.0]

    With ``in_place=True`` (``.grad`` are views into a gradient buffer that the backward accumulates into
    whatever the views say, as FSDP's flat gradient is), the earlier gradients are copied aside and ``.grad``
    is zeroed in place instead: one gradient-sized copy, and ``.grad`` stays the same tensor::

        >>> (2 * w).sum().backward()            # .grad is now 7
        >>> view = w.grad
        >>> stash = GradientStash([w], in_place=True)
        >>> stash.stash()
        >>> w.grad is view, w.grad.tolist()
        (True, [0.0, 0.0, 0.0])
        >>> stash.merge()
        >>> w.grad.tolist()
        [7.0, 7.0, 7.0]
    """

    def __init__(self, params: Iterable[torch.Tensor], in_place: bool = False) -> None:
        self.params: List[torch.Tensor] = [p for p in params]
        self.in_place = in_place
        self._saved: Optional[List[Optional[torch.Tensor]]] = None

    @property
    def active(self) -> bool:
        """Whether gradients are currently held aside."""
        return self._saved is not None

    def stash(self) -> None:
        """Move every ``.grad`` aside (idempotent while active)."""
        if self._saved is not None:
            return
        saved: List[Optional[torch.Tensor]] = []
        if self.in_place:
            grads = [p.grad for p in self.params if p.grad is not None]
            copies = iter(torch._foreach_mul(grads, 1.0)) if grads else iter(())
            saved = [None if p.grad is None else next(copies) for p in self.params]
            if grads:
                torch._foreach_zero_(grads)
        else:
            for p in self.params:
                saved.append(p.grad)
                p.grad = None
        self._saved = saved

    def take(self) -> List[Optional[torch.Tensor]]:
        """Return the gradients held aside (one per parameter, ``None`` where there was none) and forget them."""
        saved, self._saved = self._saved, None
        return saved if saved is not None else [None] * len(self.params)

    def merge(self) -> None:
        """Put the earlier gradients back, adding them to whatever ``.grad`` holds now (idempotent)."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        to_add: List[torch.Tensor] = []
        into: List[torch.Tensor] = []
        for p, old in zip(self.params, saved):
            if old is None:
                continue
            if p.grad is None:
                p.grad = old
            else:
                into.append(p.grad)
                to_add.append(old)
        if into:
            torch._foreach_add_(into, to_add)
