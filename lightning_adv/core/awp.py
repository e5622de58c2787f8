"""AWP: Adversarial Weight Perturbation (Wu et al., 2020), in the form used in NLP competitions."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from lightning_adv.core.attack import ParameterAttack, SavedRows, norm_and_rows, norms
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
        if self._host:
            return self._perturb_on_host(params)
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

    def _perturb_on_host(self, params: List[torch.Tensor]) -> torch.Tensor:
        """The same perturbation, parameter by parameter, each saved right before it moves.

        The reference's ``min(max(w + step, w0 - e), w0 + e)``, with ``w0`` the saved weight and
        ``e = adv_eps * |w0|``, is computed as ``w0 + clamp(w - w0 + step, -e, e)``. For a whole parameter,
        in seven passes (nine after an earlier adversarial pass moved it): the clamped perturbation in its
        gradient buffer, which this pass discards, and the bound in the weight itself, rewritten from ``w0``
        at the end. Where the gradient is zero on most rows (an embedding matrix: a batch touches few of its
        rows), only the rows it moves: a row whose gradient is zero keeps its value, as in the reference.
        """
        index = [i for i, p in enumerate(params) if p.grad is not None]
        found = {i: norm_and_rows(params[i].grad) for i in index}
        finite = all(math.isfinite(n) for n, _ in found.values())
        eps = self.adv_eps
        if not finite or eps == 0:  # skipped, or every weight clamped back to its saved value: nothing moves
            return torch.tensor(finite)
        c = self.grad_scale
        for i in index:
            grad_norm, rows = found[i]
            w, g = params[i].detach(), params[i].grad
            weight_norm = float(torch.linalg.vector_norm(w, dtype=torch.promote_types(w.dtype, torch.float32)))
            scale = self.adv_lr * c * (weight_norm + _GUARD) / (grad_norm * c + _GUARD)
            if grad_norm == 0 or scale == 0:  # no step: the weight stays where it is, within its bounds
                continue
            fresh = self._backup[i] is None  # not moved yet: w is w0
            saved = self._hold(i, rows)
            if isinstance(saved, SavedRows):
                _clamped_step_rows(w, g, saved, scale, eps, fresh)
                continue
            g.mul_(scale)  # the step
            if fresh:
                w.abs_()
            else:
                g.add_(w.sub_(saved))  # w - w0 + step
                torch.abs(saved, out=w)
            w.mul_(eps)  # e
            torch.minimum(g, w, out=g)
            torch.maximum(g, w.neg_(), out=g)
            torch.add(saved, g, out=w)
        return torch.tensor(True)

    def _before_pass(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad:  # frozen ones (another optimizer's, under toggle_optimizer) keep theirs
                p.grad = None


def _clamped_step_rows(w: torch.Tensor, g: torch.Tensor, saved: SavedRows, scale: float, eps: float, fresh: bool) -> None:
    """``w0 + clamp(w - w0 + scale * g, -eps |w0|, eps |w0|)`` on the saved rows of ``w`` only."""
    rows, w0 = saved
    d = g.index_select(0, rows).mul_(scale)  # the step
    if not fresh:
        d.add_(w.index_select(0, rows).sub_(w0))  # w - w0 + step (0 + step on rows saved in this pass)
    e = w0.abs().mul_(eps)
    torch.minimum(d, e, out=d)
    torch.maximum(d, e.neg_(), out=d)
    w.index_copy_(0, rows, d.add_(w0))


def check_steps(owner: str, adv_step: int) -> None:
    """Raise ``ValueError`` naming ``adv_step`` when it is not an integer >= 1."""
    if isinstance(adv_step, bool) or not isinstance(adv_step, int) or adv_step < 1:
        raise ValueError(f"{owner}(adv_step={adv_step!r}): adv_step must be an integer >= 1 (the number of adversarial passes).")
