"""The method contract: what a method declares to the engine, and the calls the engine makes on it.

The engine (:class:`~lightning_adv.core.step.AttackStep`) names no method: it reads these declarations and applies
them. A new method subclasses :class:`~lightning_adv.core.Method` (which implements this contract), sets the
attributes below and overrides the calls it needs; the README's "How to add a method" shows a complete one.

How a method's contribution combines with the micro-batch's clean gradient (``combine``):

* ``"add"``: its passes' gradients are added to the clean gradient (FGM, PGD, FreeLB);
* ``"replace"``: the gradient of its last pass replaces the clean gradient (AWP, SAM);
* ``"extend_loss"``: it adds to the clean loss before the clean backward, in :meth:`before_backward` (R3F, SMART,
  NEFTune's noise); it runs no pass after the backward.

and ``clean_weight``: a factor on the clean gradient (FreeLB: ``1 / (1 + adv_steps)``, its clean pass being one of
its passes), applied once by the gradient ledger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, FrozenSet, Literal, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from lightning_adv.core.passes import Outcome, PassOutput

Combine = Literal["add", "replace", "extend_loss"]
COMBINE_RULES = ("add", "replace", "extend_loss")


class Contract:
    """The declarations and calls of a method (see the module docstring); no behaviour beyond the defaults.

    Attributes:
        name: the short name used in log keys (``adv/<name>_loss``).
        combine: ``"add"``, ``"replace"`` or ``"extend_loss"``: how the method's gradient combines with the clean one.
        clean_weight: factor applied to the micro-batch's clean gradient (1.0: none).
        needs_logits: whether the step must return its logits (``{"loss": loss, "logits": logits}``).
        reads_gradient: whether the method reads or clears the parameter gradients (``step.clean_grads``,
            ``step.zero_grad``): refused where gradients are views into a sharded buffer (FSDP), unless
            ``sharded_gradient``.
        sharded_gradient: whether a method that reads the gradients is also right on a shard of them: it reads them
            elementwise and takes its sums over all parameters through ``step.norm_over_shards`` (SAM's global norm),
            on every process, also one that holds no gradient; such a method runs under FSDP.
        needs_clean_pass: whether the method must see the clean forward (it perturbs from :meth:`prepare` on).
    """

    name: str = "adv"
    combine: Combine = "add"
    clean_weight: float = 1.0
    needs_logits: bool = False
    reads_gradient: bool = False
    sharded_gradient: bool = False
    needs_clean_pass: bool = False

    @property
    def replaces_gradient(self) -> bool:
        """``combine == "replace"``."""
        return self.combine == "replace"

    @property
    def runs_after_backward(self) -> bool:
        """Whether the method runs passes after the clean backward (every rule but ``"extend_loss"``)."""
        return self.combine != "extend_loss"

    def enabled(self) -> bool:
        """Whether the hyperparameters ask for any attack (FGM with ``epsilon=0`` does not)."""
        return True

    def describe(self) -> str:
        """What the method perturbs, for the message at the start of training."""
        return ""

    def perturbs(self) -> FrozenSet[int]:
        """The ids of the modules or parameters the method perturbs: two methods of one class on a common one are
        refused (:func:`~lightning_adv.core.step.check_composition`)."""
        return frozenset()

    def compose(self, others: Sequence["Contract"]) -> None:
        """Raise ``ValueError`` naming why, when the method cannot run in one micro-batch with ``others`` (the rules
        the engine knows from the declarations alone are in :func:`~lightning_adv.core.step.check_composition`)."""

    def prepare(self, step: Any) -> None:
        """Before the clean forward (install hooks, perturb what the clean pass must see)."""

    def before_pass(self, step: Any) -> None:
        """Before every forward of the micro-batch after the clean one (any method's pass)."""

    def before_backward(self, step: Any, clean: Optional["PassOutput"]) -> None:
        """After the clean forward, before its backward (``"extend_loss"`` methods add to the loss here)."""

    def run(self, step: Any) -> "Outcome":
        """After the clean backward: the method's passes (``step.forward``, ``step.backward``); what it did."""
        raise NotImplementedError

    def finish(self) -> None:
        """At the end of the micro-batch, also after an error: restore, remove hooks, drop references."""


__all__ = ["COMBINE_RULES", "Combine", "Contract"]
