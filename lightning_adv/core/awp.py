"""AWP: Adversarial Weight Perturbation (Wu et al., 2020), in the form used in NLP competitions."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from lightning_adv.core.attack import ParameterAttack, norms
from lightning_adv.core.fgm import check_non_negative
from lightning_adv.core.params import select_trainable

_GUARD = 1e-6  # the reference's guard against a zero norm


class AWP(ParameterAttack):
    """Adversarial Weight Perturbation: move the weights up their gradient, within ``adv_eps·|w|``, and
    *replace* the gradient by the gradient at the perturbed weights.

    Each of the ``adv_step`` passes adds ``adv_lr * g / (||g|| + 1e-6) * (||w|| + 1e-6)`` to every matched
    parameter (``g`` its current gradient), clamps each element to ``[w0 - adv_eps|w0|, w0 + adv_eps|w0|]``
    around its saved value ``w0``, clears the gradients and backpropagates the loss at the perturbed
    weights. Only one copy of the perturbed weights is saved; the bounds are derived from it in the
    gradient buffers, which the attack discards anyway. A non-finite gradient norm (an fp16 overflow)
    leaves the weights unperturbed for that pass.

    With gradient accumulation, the gradient of earlier micro-batches must be kept out of ``.grad`` during
    the attack (see :class:`~lightning_adv.core.GradientStash`), or it is replaced too.

    Args:
        model: the model; every trainable parameter whose name contains ``adv_param`` is perturbed and every
            gradient of ``model`` is replaced.
        adv_param: substring of the names of the parameters to perturb.
        adv_lr: the step size, relative to the weight norm; 0 disables the attack.
        adv_eps: the bound of the perturbation of each element, relative to its absolute value.
        adv_step: the number of adversarial passes.

    Example (a hand-written loop)::

        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> awp = AWP(model, adv_lr=1.0, adv_eps=0.2, adv_step=1)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> loss_fn = lambda: nn.functional.cross_entropy(model(x), y)
        >>> clean = loss_fn(); clean.backward()
        >>> adv = awp.attack_backward(loss_fn)    # .grad now holds the gradient at the perturbed weights
        >>> bool(adv > clean)                     # the perturbation increased the loss
        True
    """

    def __init__(
        self,
        model: nn.Module,
        adv_param: str = "weight",
        adv_lr: float = 1.0,
        adv_eps: float = 0.2,
        adv_step: int = 1,
    ) -> None:
        owner = type(self).__name__
        check_non_negative(owner, adv_lr=adv_lr, adv_eps=adv_eps)
        check_steps(owner, adv_step)
        super().__init__(model, select_trainable(model, adv_param, owner=owner, argument="adv_param", hint="weight"))
        self.adv_lr = float(adv_lr)
        self.adv_eps = float(adv_eps)
        self.num_passes = int(adv_step)

    @torch.no_grad()
    def _perturb(self, params: List[torch.Tensor]) -> torch.Tensor:
        assert self._backup is not None
        index = [i for i, p in enumerate(params) if p.grad is not None]
        weights = [params[i].detach() for i in index]
        grads = [params[i].grad for i in index]
        saved = [self._backup[i] for i in index]
        if not index:
            return torch.ones((), dtype=torch.bool)
        grad_norms = norms(grads)
        weight_norms = norms(weights)
        finite = torch.isfinite(grad_norms).all()
        usable = finite & (grad_norms != 0)
        c = self.grad_scale
        scales = torch.where(usable, self.adv_lr * c * (weight_norms + _GUARD) / (grad_norms * c + _GUARD), 0.0)
        # the gradient buffers are discarded after this pass: compute the step and then the bound in them
        torch._foreach_mul_(grads, list(scales.unbind()))
        for step in grads:  # inf * 0 would be nan: a skipped pass must leave the weights as they are
            step.nan_to_num_(0.0, 0.0, 0.0)
        torch._foreach_add_(weights, grads)
        bound = grads
        torch._foreach_copy_(bound, saved)
        torch._foreach_abs_(bound)
        torch._foreach_mul_(bound, self.adv_eps)
        torch._foreach_sub_(weights, saved)  # weights now hold the perturbation
        torch._foreach_minimum_(weights, bound)
        torch._foreach_neg_(bound)
        torch._foreach_maximum_(weights, bound)
        torch._foreach_add_(weights, saved)
        return finite

    def _before_pass(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad:  # frozen ones (another optimizer's, under toggle_optimizer) keep theirs
                p.grad = None


def check_steps(owner: str, adv_step: int) -> None:
    """Raise ``ValueError`` naming ``adv_step`` when it is not an integer >= 1."""
    if isinstance(adv_step, bool) or not isinstance(adv_step, int) or adv_step < 1:
        raise ValueError(f"{owner}(adv_step={adv_step!r}): adv_step must be an integer >= 1 (the number of adversarial passes).")
