"""The shared perturb / forward / backward / restore loop of every parameter-space attack."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

import torch
from torch import nn

from lightning_adv.core.params import NamedParameters, with_grad

LossClosure = Callable[[], Optional[torch.Tensor]]
Backward = Callable[[torch.Tensor], None]


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


class ParameterAttack(ABC):
    """Base of the attacks: perturb some parameters from their gradient, backpropagate a loss, restore them.

    Subclasses define how many adversarial passes run (:attr:`num_passes`), the perturbation of one pass
    (:meth:`_perturb`) and what happens to the gradient before a pass (:meth:`_before_pass`). The saved
    copy of the perturbed parameters is the only state held across the adversarial forward and backward,
    and the parameters are restored in place in ``finally``, whatever the closure raises.

    Nothing here synchronises the host with the device: norms, the finite check and the scaling stay on
    the device (``torch.where``, ``torch._foreach_*``).
    """

    num_passes: int = 1

    def __init__(self, model: nn.Module, named_params: NamedParameters) -> None:
        self.model = model
        self.named_params = list(named_params)
        self._backup: Optional[List[torch.Tensor]] = None
        self._perturbed: List[torch.Tensor] = []
        self.last_skipped: Optional[torch.Tensor] = None
        """0-d bool tensor: whether the last attack was skipped for a non-finite gradient norm."""
        self.last_loss: Optional[torch.Tensor] = None
        """The detached loss of the last adversarial pass."""
        self.grad_scale: float = 1.0
        """Factor from the gradients in ``.grad`` to the gradient the attack is defined on: ``1 / world_size``
        under DDP, where a rank holds its local gradient of which the optimizer step sees the mean. Only
        size-dependent terms see it (AWP's 1e-6 guard); directions do not."""

    @property
    def parameters(self) -> List[torch.Tensor]:
        """The parameters this attack may perturb (trainable or not, as matched)."""
        return [p for _, p in self.named_params]

    def saved_bytes(self) -> int:
        """Bytes held by the saved state while an attack is under way (0 outside of one)."""
        return sum(t.numel() * t.element_size() for t in self._backup or [])

    def attack_backward(
        self,
        closure: LossClosure,
        backward: Optional[Backward] = None,
        before_last_pass: Optional[Callable[[], None]] = None,
    ) -> torch.Tensor:
        """Run the attack from the gradients in ``.grad`` and backpropagate the adversarial loss.

        Args:
            closure: computes the loss of the batch at the current (perturbed) parameters.
            backward: backpropagates that loss; defaults to ``loss.backward()``. Pass your own to scale the
                loss (``GradScaler``), divide it for accumulation, or go through a framework.
            before_last_pass: called right before the forward of the last adversarial pass, e.g. to merge
                the gradients of earlier micro-batches back or to arm a DDP gradient all-reduce.

        Returns:
            The detached loss of the last adversarial pass, or ``None`` if no matched parameter holds a
            gradient (nothing to attack: no pass runs, ``before_last_pass`` is still called).
        """
        backward = backward or _plain_backward
        params = with_grad(self.parameters)
        if not params:
            if before_last_pass is not None:
                before_last_pass()
            return None
        self._perturbed = params
        self._backup = [p.detach().clone() for p in params]
        loss: Optional[torch.Tensor] = None
        try:
            for i in range(self.num_passes):
                finite = self._perturb(params)
                if i == 0:
                    self.last_skipped = ~finite
                self._before_pass()
                if i == self.num_passes - 1 and before_last_pass is not None:
                    before_last_pass()
                loss = closure()
                if loss is None:
                    raise RuntimeError(
                        f"{type(self).__name__}: the adversarial loss closure returned None; it must return the loss "
                        "tensor of the batch at the perturbed parameters."
                    )
                backward(loss)
        finally:
            self.restore()
        self.last_loss = loss.detach()
        return self.last_loss

    @contextmanager
    def perturbed(self) -> Iterator[torch.Tensor]:
        """Perturb once from the gradients in ``.grad`` and restore on exit; yields the 0-d bool "all finite".

        For evaluation under attack (no backward needed)::

            >>> import torch
            >>> from lightning_adv.core import FGM
            >>> emb = torch.nn.Embedding(5, 3)
            >>> fgm = FGM(emb, epsilon=1.0, emb_name="weight")
            >>> emb(torch.tensor([1, 2])).sum().backward()
            >>> before = emb.weight.detach().clone()
            >>> with fgm.perturbed():
            ...     moved = float((emb.weight - before).norm())
            >>> round(moved, 6), bool(torch.equal(emb.weight, before))
            (1.0, True)
        """
        params = with_grad(self.parameters)
        self._perturbed = params
        self._backup = [p.detach().clone() for p in params]
        try:
            yield self._perturb(params)
        finally:
            self.restore()

    def restore(self) -> None:
        """Copy the saved values back into the perturbed parameters, in place (idempotent)."""
        backup, self._backup = self._backup, None
        if backup is not None:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self._perturbed], backup)
        self._perturbed = []

    @abstractmethod
    def _perturb(self, params: List[torch.Tensor]) -> torch.Tensor:
        """Perturb ``params`` in place from their ``.grad``; return a 0-d bool: all gradient norms finite."""

    def _before_pass(self) -> None:
        """Called after each perturbation, before the adversarial forward."""


def norms(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every tensor, stacked into one float32-or-wider vector on their device."""
    return torch.stack([n.to(torch.promote_types(n.dtype, torch.float32)) for n in torch._foreach_norm(tensors)])
