"""PGD on the embedding weights, in the form of the NLP competitions (fyubang's snippet, bert4torch)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from lightning_adv.core.checks import check_int, check_non_negative, check_pattern
from lightning_adv.core.fgm import scaled_steps
from lightning_adv.core.method import ParameterMethod
from lightning_adv.core.params import select_trainable
from lightning_adv.core.snapshot import Regions, Snapshot, norms
from lightning_adv.core.step import AttackStep, Outcome


class PGD(ParameterMethod):
    """Projected gradient ascent on the embedding weights: ``steps`` passes, the last one's gradient added.

    Each pass moves every matched parameter by ``alpha * g / ||g||_F`` (``g``: the clean gradient for the
    first pass, then the gradient of the previous pass; no move where the norm is 0) and projects ``W - W0``
    onto the Frobenius ball of radius ``epsilon``. The gradients of all passes but the last are discarded;
    the last one is added to the clean gradient. Cost: ``steps`` forward and backward passes, of which the
    ``steps - 1`` inner ones compute the gradient of the perturbed parameters alone (no weight gradient elsewhere:
    about two thirds of a forward+backward each; the gradients are the same to the bit).

    Args:
        model: the model; every trainable parameter whose name contains ``emb_name`` is perturbed.
        epsilon: radius of the ball around the clean weights (>= 0).
        alpha: size of each ascent step (>= 0); 0 disables the attack.
        steps: number of adversarial passes (>= 1).
        emb_name: substring of the names of the parameters to perturb.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import PGD, adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> pgd = PGD(model, epsilon=1.0, alpha=0.3, steps=3, emb_name="0.weight")
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> (outcome,) = adversarial_backward(model, [pgd], lambda: nn.functional.cross_entropy(model(x), y))
        >>> bool(outcome.skipped)
        False
    """

    name = "pgd"

    def __init__(
        self, model: nn.Module, epsilon: float = 1.0, alpha: float = 0.3, steps: int = 3, emb_name: str = "word_embeddings"
    ) -> None:
        self.check_arguments(type(self).__name__, epsilon, alpha, steps, emb_name)
        super().__init__(model, select_trainable(model, emb_name, owner=type(self).__name__, argument="emb_name", hint="embed"))
        self.epsilon, self.alpha, self.steps = float(epsilon), float(alpha), int(steps)
        self.stats: Dict[str, torch.Tensor] = {}
        """What the last attack measured (0-d tensors on the device): ``grad_norm``, the L2 norm of the clean
        gradient of the matched parameters (all together), the first pass's direction."""

    @staticmethod
    def check_arguments(owner: str, epsilon: float, alpha: float, steps: int, emb_name: str) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, epsilon=epsilon, alpha=alpha)
        check_int(owner, "steps", steps, 1, "the number of adversarial passes")
        check_pattern(owner, "emb_name", emb_name)

    def enabled(self) -> bool:
        return self.alpha != 0

    def run(self, step: AttackStep) -> Outcome:
        return self._passes(step, self.steps)

    def perturb(self, snapshot: Snapshot, regions: Regions, pass_index: int) -> torch.Tensor:
        grad_norms = norms(regions.grads)
        if pass_index == 0:
            self.stats["grad_norm"] = torch.linalg.vector_norm(grad_norms)
        finite = torch.isfinite(grad_norms).all()
        torch._foreach_add_(regions.weights, scaled_steps(regions.grads, self.alpha, finite, grad_norms))
        moved = torch._foreach_sub(regions.weights, regions.saved)
        moved_norms = norms(moved)
        outside = moved_norms > self.epsilon
        factors = torch.where(outside, self.epsilon / torch.where(outside, moved_norms, 1.0), 1.0)
        torch._foreach_mul_(moved, list(factors.unbind()))
        torch._foreach_add_(moved, regions.saved)  # the projected weights
        for w, projected, out in zip(regions.weights, moved, outside.unbind()):
            w.copy_(torch.where(out, projected, w))
        return finite
