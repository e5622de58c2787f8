"""AWP: Adversarial Weight Perturbation (Wu et al., 2020), in the form used in NLP competitions."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from lightning_adv.core.checks import check_int, check_non_negative, check_pattern
from lightning_adv.core.method import ParameterMethod
from lightning_adv.core.params import select_trainable
from lightning_adv.core.snapshot import Regions, Snapshot, norms, zero_nonfinite
from lightning_adv.core.step import AttackStep, Outcome

_GUARD = 1e-6  # the reference's guard against a zero norm


class AWP(ParameterMethod):
    """Adversarial Weight Perturbation: move the weights up their gradient, within ``adv_eps·|w|``, and
    *replace* the gradient by the gradient at the perturbed weights.

    Each of the ``adv_step`` passes adds ``adv_lr * g / (||g|| + 1e-6) * (||w|| + 1e-6)`` to every matched
    parameter (``g``: the clean gradient, then the previous pass's), keeps each element within
    ``[w0 - adv_eps|w0|, w0 + adv_eps|w0|]`` around its saved value ``w0``, discards the gradients and
    backpropagates the loss at the perturbed weights. The bounds are computed in the gradient buffers, which
    the pass discards anyway: only one copy of the weights is saved. A non-finite gradient norm (an fp16
    overflow) leaves the weights unperturbed.

    Args:
        model: the model; every trainable parameter whose name contains ``adv_param`` is perturbed.
        adv_param: substring of the names of the parameters to perturb.
        adv_lr: the step size, relative to the weight norm; 0 disables the attack.
        adv_eps: the bound of the perturbation of each element, relative to its absolute value.
        adv_step: the number of adversarial passes.

    Example (a hand-written loop)::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> awp = AWP(model, adv_lr=1.0, adv_eps=0.2, adv_step=1)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda: nn.functional.cross_entropy(model(x), y)
        >>> clean = loss_fn(); clean.backward()
        >>> adv = awp.attack_backward(loss_fn)    # .grad now holds the gradient at the perturbed weights
        >>> bool(adv > clean)                     # the perturbation increased the loss
        True
    """

    name = "awp"
    combine = "replace"

    def __init__(
        self, model: nn.Module, adv_param: str = "weight", adv_lr: float = 1.0, adv_eps: float = 0.2, adv_step: int = 1
    ) -> None:
        self.check_arguments(type(self).__name__, adv_param, adv_lr, adv_eps, adv_step)
        super().__init__(model, select_trainable(model, adv_param, owner=type(self).__name__, argument="adv_param", hint="weight"))
        self.adv_lr, self.adv_eps, self.adv_step = float(adv_lr), float(adv_eps), int(adv_step)
        self._grad_scale = 1.0
        self.stats: Dict[str, torch.Tensor] = {}
        """What the last attack measured (0-d tensors on the device): ``grad_norm``, the L2 norm of the clean
        gradient of the matched parameters (all together), the first pass's direction."""

    @staticmethod
    def check_arguments(owner: str, adv_param: str, adv_lr: float, adv_eps: float, adv_step: int) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, adv_lr=adv_lr, adv_eps=adv_eps)
        check_int(owner, "adv_step", adv_step, 1, "the number of adversarial passes")
        check_pattern(owner, "adv_param", adv_param)

    def enabled(self) -> bool:
        return self.adv_lr != 0

    def run(self, step: AttackStep) -> Outcome:
        self._grad_scale = step.grad_scale
        return self._passes(step, self.adv_step, writable=True)

    def perturb(self, snapshot: Snapshot, regions: Regions, pass_index: int) -> torch.Tensor:
        weight_norms = norms([snapshot.params[i].detach() for i in regions.index])
        grads, weights, saved = regions.grads, regions.weights, regions.saved
        grad_norms = norms(grads)
        if pass_index == 0:
            self.stats["grad_norm"] = torch.linalg.vector_norm(grad_norms)
        finite = torch.isfinite(grad_norms).all()
        usable = finite & (grad_norms != 0)
        c = self._grad_scale
        scales = torch.where(usable, self.adv_lr * c * (weight_norms + _GUARD) / (grad_norms * c + _GUARD), 0.0)
        zero_nonfinite(grads, finite)  # inf * 0 would be nan: a skipped pass (scale 0) must leave the weights as they are
        torch._foreach_addcmul_(weights, grads, list(scales.unbind()))  # w += scale * g in one pass, no host sync
        # keep w within [w0 - eps|w0|, w0 + eps|w0|], the bounds built in the gradient buffers (scratch from here):
        # 6 passes over the weights (with the step), one copy of them saved (the snapshot's)
        bound = grads
        for b, w0 in zip(bound, saved):
            torch.abs(w0, out=b)
            torch.add(w0, b, alpha=self.adv_eps, out=b)  # the upper bound w0 + eps|w0|
        torch._foreach_minimum_(weights, bound)
        torch._foreach_lerp_(bound, saved, 2.0)  # the lower bound: 2 w0 - (w0 + eps|w0|)
        torch._foreach_maximum_(weights, bound)
        return finite
