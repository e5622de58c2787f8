"""The gradient ledger: where each gradient of a micro-batch lives between its clean backward and the merge.

A micro-batch's ``.grad`` receives, in turn, the gradients of earlier micro-batches (accumulation), its own clean
gradient, and the gradients of the methods' passes. The engine (:class:`~lightning_adv.core.step.AttackStep`) asks
the ledger to keep them apart and to merge them, once, before the step's last backward (the one DDP all-reduces):

``.grad = earlier + clean_weight * clean + sum(added) `` — or ``earlier + replacement + sum(added)`` when a method
replaces the clean gradient. ``clean_weight`` is the product of the methods' declared clean weights (FreeLB:
``1 / (1 + adv_steps)``) and is applied here only.

Two storage strategies, one per mode:

* :class:`MovingLedger` (the default): tensors are moved aside by swapping ``.grad`` references, no copy. With one
  method after the backward the clean gradient stays in ``.grad`` ("live": no second gradient-sized buffer) until
  a method clears ``.grad`` or overwrites it.
* :class:`InPlaceLedger` (gradients that are views into a buffer owned elsewhere, FSDP's flat gradient): ``.grad`` is
  never reassigned; everything accumulates in it, and the earlier micro-batches' part is divided by the clean weight
  before the clean backward, so that one multiplication after it leaves ``earlier + clean_weight * clean``. When a
  method reads the gradient (SAM, the one ``sharded_gradient`` method), the earlier part is copied aside and
  ``.grad`` zeroed in place instead, so that ``.grad`` holds the clean gradient alone, which the method gets as
  scratch; clearing the passes zeroes ``.grad`` in place, and the merge adds the earlier part back.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch

from lightning_adv.core.grads import GradientStash

Grads = List[Optional[torch.Tensor]]


def _present(grads: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    return [g for g in grads if g is not None]


def _scale(grads: Sequence[Optional[torch.Tensor]], factor: float) -> None:
    present = _present(grads)
    if present and factor != 1.0:
        torch._foreach_mul_(present, factor)


class MovingLedger:
    """Keeps the micro-batch's gradients apart by moving ``.grad`` tensors (see the module docstring)."""

    in_place = False

    def __init__(self, params: Sequence[torch.Tensor], clean_weight: float = 1.0) -> None:
        self.params = list(params)
        self.clean_weight = clean_weight
        self.earlier = GradientStash(self.params)
        self.merged = False
        self._position: Dict[int, int] = {id(p): i for i, p in enumerate(self.params)}
        self._live = False  # the clean gradient is in .grad (one method after the backward)
        self._clean: Optional[Grads] = None  # the clean gradient, moved aside
        self._base: Optional[Grads] = None  # what the merge adds for the clean gradient: it, or a replacement
        self._base_weight = 1.0
        self._added: List[Grads] = []

    # -- the engine's calls, in order ----------------------------------------------------------------------------------
    def set_aside_earlier(self) -> None:
        """Before the clean backward: the earlier micro-batches' gradients out of ``.grad``."""
        self.earlier.stash()

    def receive_clean(self, keep_in_grad: bool) -> None:
        """After the clean backward: with ``keep_in_grad`` the clean gradient stays in ``.grad`` weighted in place
        (the methods' passes then accumulate onto it); else it is moved aside, its weight applied at the merge."""
        if keep_in_grad:
            self._live = True
            _scale(self._grads(), self.clean_weight)
        else:
            self._clean = self._base = self._take()
            self._base_weight = self.clean_weight

    def clean(self, params: Sequence[torch.Tensor], writable: bool, scratch: bool) -> Grads:
        """The clean gradient of ``params`` for a method's direction. ``writable``: the method may overwrite what it
        gets (copies, since a skipped attack falls back to it); ``scratch``: it replaces the clean gradient anyway, so
        the live tensors themselves are handed over (no copy: nothing falls back to them)."""
        if self._live:
            grads = [p.grad if id(p) in self._position else None for p in params]
            if writable and scratch:
                self._live = False
                return grads
        else:
            assert self._clean is not None, "the clean gradient is only available while the methods run"
            grads = [self._clean[self._position[id(p)]] if id(p) in self._position else None for p in params]
        return [None if g is None else g.clone() for g in grads] if writable else grads

    def clear_passes(self) -> None:
        """Discard what the current method's passes put in ``.grad`` (the clean gradient is moved aside first)."""
        if self._live:
            self._live = False
            self._clean = self._base = self._grads()
        for p in self.params:
            p.grad = None

    def settle(self, replaces: bool) -> None:
        """After a method's passes, before the merge: keep what they put in ``.grad`` apart (added, or replacing the
        clean gradient)."""
        grads = self._take()
        if replaces:
            self._base, self._base_weight = grads, 1.0
        else:
            self._added.append(grads)

    def merge(self, replacing: bool) -> None:
        """Before the step's last backward: ``.grad`` = what it holds + the clean gradient (weighted; left out when
        ``replacing``) or its replacement + every added part + the earlier micro-batches'."""
        self._live = False
        lists: List[Grads] = [self._take()]
        if not replacing and self._base is not None:
            _scale(self._base, self._base_weight)
            lists.append(self._base)
        lists += self._added + [self.earlier.take()]
        into: List[torch.Tensor] = []
        add: List[torch.Tensor] = []
        for j, p in enumerate(self.params):
            values = [grads[j] for grads in lists if grads[j] is not None]
            p.grad = values[0] if values else None
            if len(values) > 1:
                into += [values[0]] * (len(values) - 1)
                add += values[1:]
        if add:
            torch._foreach_add_(into, add)
        self._clean = self._base = None  # no gradient-sized buffer outlives the merge besides .grad
        self._added = []
        self.merged = True

    def skipped(self, weight: float, backwards: int, name: str) -> None:
        """A method's pass returned None: drop what its passes added, keep the clean gradient where it is, without
        the method's own clean weight."""
        if not self._live:
            for p in self.params:
                p.grad = None
            if self._base is not None and self._base is self._clean:
                self._base_weight /= weight
        elif backwards == 0:  # still only the (weighted) clean gradient in .grad
            _scale(self._grads(), 1.0 / weight)

    def close(self) -> None:
        """Whatever happened: merge what is still apart, and put the earlier gradients back (idempotent)."""
        if not self.merged and (self._clean is not None or self._live):
            self.merge(replacing=False)
        self.earlier.merge()

    # -- helpers ---------------------------------------------------------------------------------------------------------
    def _grads(self) -> Grads:
        return [p.grad for p in self.params]

    def _take(self) -> Grads:
        grads = self._grads()
        for p in self.params:
            p.grad = None
        return grads


class InPlaceLedger(MovingLedger):
    """For ``.grad`` that are views into a buffer owned elsewhere (FSDP with ``use_orig_params=True``): ``.grad`` is
    never reassigned, only changed in place; the earlier micro-batches' gradients stay in it (FSDP reduces them with
    the step's last backward). One method at most runs after the backward, and none reads or clears ``.grad``."""

    in_place = True

    def __init__(self, params: Sequence[torch.Tensor], clean_weight: float = 1.0, reads: bool = False) -> None:
        super().__init__(params, clean_weight)
        self.reads = reads
        if reads:  # the earlier gradients copied aside (one copy, with accumulation only), .grad zeroed in place
            self.earlier = GradientStash(self.params, in_place=True)

    def set_aside_earlier(self) -> None:
        """Divide the earlier gradients by the clean weight that :meth:`receive_clean` multiplies ``.grad`` by, so that
        ``.grad`` ends as ``earlier + clean_weight * clean``, with no copy and no change of shape; for a method that
        reads the gradient, copy them aside instead (``.grad`` then holds the clean gradient alone)."""
        if self.reads:
            if any(p.grad is not None for p in self.params):
                self.earlier.stash()
            return
        _scale(self._grads(), 1.0 / self.clean_weight)

    def receive_clean(self, keep_in_grad: bool) -> None:
        _scale(self._grads(), self.clean_weight)

    def clean(self, params: Sequence[torch.Tensor], writable: bool, scratch: bool) -> Grads:
        if not self.reads:
            raise RuntimeError("the clean gradient is not available with gradients that are views (FSDP)")
        grads = [p.grad for p in params]
        return [None if g is None else g.clone() for g in grads] if writable and not scratch else grads

    def clear_passes(self) -> None:
        if not self.reads:
            raise RuntimeError(
                "AttackStep.zero_grad: not available with grads_are_views (the clean gradient cannot be moved aside)"
            )
        grads = [g for g in self._grads() if g is not None]
        if grads:
            torch._foreach_zero_(grads)

    def settle(self, replaces: bool) -> None:
        """The passes' gradients stay in ``.grad``."""

    def merge(self, replacing: bool) -> None:
        self.merged = True  # everything already accumulates in .grad (the earlier part, if aside, added back here)
        self.earlier.merge()

    def skipped(self, weight: float, backwards: int, name: str) -> None:
        if backwards == 0 and weight != 1.0:
            warnings.warn(
                f"{name}: a pass returned None after the clean backward; with gradients that are views "
                "(FSDP) the earlier micro-batches' gradients share `.grad` with the clean one, so this micro-batch keeps "
                f"its clean gradient weighted by {weight:g}, as if attacked.",
                RuntimeWarning,
            )

    def close(self) -> None:
        self.merged = True
        self.earlier.merge()


def ledger_for(params: Sequence[torch.Tensor], clean_weight: float, in_place: bool, reads: bool = False) -> MovingLedger:
    """The ledger of a micro-batch: in place for gradient views (``reads``: a method reads the gradient), moving
    otherwise."""
    if in_place:
        return InPlaceLedger(params, clean_weight, reads=reads)
    return MovingLedger(params, clean_weight)


__all__ = ["InPlaceLedger", "MovingLedger", "ledger_for"]
