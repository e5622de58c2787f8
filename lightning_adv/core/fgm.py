"""FGM: the Fast Gradient Method on embedding weights (Goodfellow et al., Miyato et al.)."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from lightning_adv.core.attack import ParameterAttack, norm_and_rows, norms
from lightning_adv.core.params import select_trainable


def check_non_negative(owner: str, **values: float) -> None:
    """Raise ``ValueError`` naming the argument when a value is negative or not a finite number."""
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}({name}={value!r}): {name} must be a finite number >= 0.")


class FGM(ParameterAttack):
    """Fast Gradient Method: add ``epsilon * g / ||g||`` to the embedding weights, backpropagate, restore.

    The adversarial gradient is *added* to the clean one already in ``.grad``. A parameter whose gradient
    norm is 0 is left as it is (the adversarial pass still runs, as in the reference). If any matched
    gradient norm is not finite (an fp16 overflow), nothing is perturbed and :attr:`last_skipped` is True.

    Args:
        model: the model; every trainable parameter whose name contains ``emb_name`` is perturbed.
        epsilon: the L2 norm of the perturbation of each matched parameter.
        emb_name: substring of the embedding parameter names (``"word_embeddings"`` for BERT-style models).

    Example (a hand-written loop)::

        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> fgm = FGM(model, epsilon=1.0, emb_name="0.weight")
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> loss_fn = lambda: nn.functional.cross_entropy(model(x), y)
        >>> before = model[0].weight.detach().clone()
        >>> loss_fn().backward()                 # clean gradient
        >>> adv_loss = fgm.attack_backward(loss_fn)   # adds the gradient at the perturbed embedding
        >>> bool(torch.equal(model[0].weight, before))  # restored exactly
        True
        >>> bool(adv_loss > 0)
        True
    """

    def __init__(self, model: nn.Module, epsilon: float = 1.0, emb_name: str = "word_embeddings") -> None:
        check_non_negative(type(self).__name__, epsilon=epsilon)
        super().__init__(model, select_trainable(model, emb_name, owner=type(self).__name__, argument="emb_name", hint="embed"))
        self.epsilon = float(epsilon)

    @torch.no_grad()
    def _perturb(self, params: List[torch.Tensor]) -> torch.Tensor:
        if not params:
            return torch.ones((), dtype=torch.bool)
        grads = [p.grad for p in params]
        if self._host:
            return self._perturb_on_host(params, grads)
        grad_norms = norms(grads)
        finite = torch.isfinite(grad_norms).all()
        usable = finite & (grad_norms != 0)
        scales = torch.where(usable, self.epsilon / torch.where(usable, grad_norms, 1.0), 0.0)
        steps = torch._foreach_mul(grads, list(scales.unbind()))
        for step in steps:  # inf * 0 would be nan: a skipped attack must leave the weights as they are
            step.nan_to_num_(0.0, 0.0, 0.0)
        torch._foreach_add_([p.detach() for p in params], steps)
        return finite

    def _perturb_on_host(self, params: List[torch.Tensor], grads: List[torch.Tensor]) -> torch.Tensor:
        """``w += (epsilon / ||g||) * g`` in one pass, or on the rows where ``g`` is not zero (an embedding)."""
        found = [norm_and_rows(g) for g in grads]
        finite = all(math.isfinite(n) for n, _ in found)
        if finite:
            for i, (p, g, (n, rows)) in enumerate(zip(params, grads, found)):
                if n == 0:
                    continue
                self._hold(i, rows)
                if rows is None:
                    p.detach().add_(g, alpha=self.epsilon / n)
                else:
                    p.detach().index_add_(0, rows, g.index_select(0, rows), alpha=self.epsilon / n)
        return torch.tensor(finite)
