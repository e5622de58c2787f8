"""The base of every method, and of the methods that perturb parameters by name."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, FrozenSet, Iterator, List, Optional

import torch
from torch import nn

from lightning_adv.core.contract import Contract
from lightning_adv.core.params import NamedParameters, with_grad
from lightning_adv.core.snapshot import Regions, Snapshot
from lightning_adv.core.step import AttackStep, Outcome, PassOutput


class Method(Contract):
    """An adversarial-training method: what it does around one micro-batch, driven by an :class:`AttackStep`.

    A subclass declares how its gradient combines with the clean one (``combine``, ``clean_weight``; see
    :mod:`lightning_adv.core.contract`) and implements :meth:`run` (after the clean backward: its passes, through
    ``step.forward`` and ``step.backward``) and, if it needs them, :meth:`prepare` (before the clean forward),
    :meth:`before_pass`, :meth:`before_backward` (after the clean forward) and :meth:`finish` (always, at the end of
    the micro-batch). The README's "How to add a method" has a complete one.
    """

    def __init__(self) -> None:
        self.last_loss: Optional[torch.Tensor] = None
        """The detached loss of the last adversarial pass."""
        self.last_skipped: Optional[torch.Tensor] = None
        """0-d bool tensor: whether the last attack was skipped."""

    def attack_backward(self, closure: Callable[[], Any], backward: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """In a plain loop, after ``loss.backward()``: run this method from the gradients in ``.grad`` (its clean
        gradient) and backpropagate its passes; ``.grad`` then holds the step's gradient. Returns the detached
        adversarial loss.

        Raises:
            RuntimeError: no parameter holds a gradient (call ``loss.backward()`` first).
        """
        if self.needs_clean_pass:
            name = type(self).__name__
            raise RuntimeError(
                f"{name}.attack_backward: {name} perturbs the embedding output from the clean forward on, so it cannot "
                "start after your own loss.backward(). Run the whole micro-batch with "
                f"lightning_adv.core.adversarial_backward(model, [{name.lower()}], loss_fn) instead of "
                "loss.backward() + attack_backward."
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not any(p.grad is not None for p in params):
            raise RuntimeError(
                f"{type(self).__name__}.attack_backward: no parameter of the model holds a gradient. Backpropagate the "
                "clean loss first (loss = loss_fn(); loss.backward(); method.attack_backward(loss_fn)), or use "
                "lightning_adv.core.adversarial_backward(model, [method], loss_fn), which does both."
            )
        step = AttackStep(params, [self], closure, backward)
        try:
            (outcome,) = step.after_backward()
        finally:
            step.close()
        return self._remember(outcome)

    def _remember(self, outcome: Outcome) -> torch.Tensor:
        self.last_loss, self.last_skipped = outcome.loss, outcome.skipped
        return outcome.loss


class ParameterMethod(Method):
    """A method that perturbs parameters matched by name: a snapshot restores them after the passes."""

    reads_gradient = True

    def __init__(self, model: nn.Module, named_params: NamedParameters) -> None:
        super().__init__()
        self.model = model
        self.named_params = list(named_params)
        self._snapshot: Optional[Snapshot] = None

    @property
    def parameters(self) -> List[torch.Tensor]:
        """The parameters this method may perturb."""
        return [p for _, p in self.named_params]

    def perturbs(self) -> FrozenSet[int]:
        return frozenset(id(p) for _, p in self.named_params)

    def describe(self) -> str:
        names = [name for name, _ in self.named_params]
        values = sum(p.numel() for _, p in self.named_params)
        shown = names if len(names) <= 5 else names[:4] + [f"... ({len(names) - 5} more)", names[-1]]
        return f"{len(names)} parameter{'s' * (len(names) != 1)} ({values:,} values): {', '.join(shown)}"

    def saved_bytes(self) -> int:
        """Bytes held by the saved state while an attack is under way (0 outside of one)."""
        return self._snapshot.nbytes() if self._snapshot is not None else 0

    def perturb(self, snapshot: Snapshot, regions: Regions, pass_index: int) -> torch.Tensor:
        """Perturb the regions in place (pass ``pass_index``); return a 0-d bool: all gradient norms finite."""
        raise NotImplementedError

    def _perturb(self, snapshot: Snapshot, grads: List[Optional[torch.Tensor]], pass_index: int) -> torch.Tensor:
        regions = snapshot.regions(grads)
        if not regions.index and not self.sharded_gradient:  # (a sharded method takes part in the sums all the same)
            return torch.ones((), dtype=torch.bool)
        with torch.no_grad():
            finite = self.perturb(snapshot, regions, pass_index)
            snapshot.write_back(regions)
        return finite

    @contextmanager
    def attacking(self, params: List[torch.Tensor]) -> Iterator[Snapshot]:
        """A snapshot of ``params`` for one attack, restored on exit whatever is raised."""
        self._snapshot = Snapshot(params)
        try:
            yield self._snapshot
        finally:
            self._snapshot.restore()
            self._snapshot = None

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
            ...     moved = float((emb.weight.detach() - before).norm())
            >>> round(moved, 6), bool(torch.equal(emb.weight, before))
            (1.0, True)
        """
        params = with_grad(self.parameters)
        with self.attacking(params) as snapshot:
            yield self._perturb(snapshot, [p.grad for p in params], 0)

    def _passes(self, step: AttackStep, num_passes: int, writable: bool = False) -> Outcome:
        """The loop of the parameter methods: perturb from the clean gradient (then from the last pass's), run
        the pass (gradients of earlier passes discarded), restore."""
        params = [p for p in self.parameters if p.requires_grad]
        grads = step.clean_grads(params, writable=writable)
        out: Optional[PassOutput] = None
        finite = torch.ones((), dtype=torch.bool)
        with self.attacking(params) as snapshot:
            for t in range(num_passes):
                finite_t = self._perturb(snapshot, grads, t)
                if t == 0:
                    finite = finite_t
                grads = []  # no reference kept: a scratch clean gradient (AWP) is freed by zero_grad
                step.zero_grad()
                if t == num_passes - 1:
                    out = step.forward(final=True)
                    step.backward(out.loss)
                    break
                # an inner pass: its gradient only directs the next perturbation, so only the perturbed parameters get one
                with step.gradients_only_for(params):
                    out = step.forward()
                    if out.loss.requires_grad:  # (not when the perturbed parameters do not reach the loss)
                        step.backward(out.loss)
                grads = [p.grad for p in params]
        assert out is not None
        return Outcome(out.loss.detach(), ~finite)
