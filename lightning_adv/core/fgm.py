"""FGM: the Fast Gradient Method on embedding weights (Goodfellow et al., 2015; Miyato et al., 2017)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from lightning_adv.core.checks import check_non_negative, check_pattern
from lightning_adv.core.method import ParameterMethod
from lightning_adv.core.params import select_trainable
from lightning_adv.core.snapshot import Regions, Snapshot, norms, zero_nonfinite
from lightning_adv.core.step import AttackStep, Outcome


def scaled_steps(grads: list, numerator: float, finite: torch.Tensor, grad_norms: torch.Tensor) -> list:
    """``numerator * g / ||g||`` for every gradient, 0 where the norm is 0 or any norm is not finite (no sync)."""
    usable = finite & (grad_norms != 0)
    scales = torch.where(usable, numerator / torch.where(usable, grad_norms, 1.0), 0.0)
    steps = torch._foreach_mul(grads, list(scales.unbind()))
    zero_nonfinite(steps, finite)  # inf * 0 would be nan: a skipped attack must leave the weights as they are
    return steps


class FGM(ParameterMethod):
    """Fast Gradient Method: add ``epsilon * g / ||g||`` to the embedding weights, backpropagate, restore.

    The adversarial gradient is *added* to the clean one. A parameter whose gradient norm is 0 is left as it
    is (the adversarial pass still runs, as in the reference). If any matched gradient norm is not finite (an
    fp16 overflow), nothing is perturbed and the attack counts as skipped.

    Args:
        model: the model; every trainable parameter whose name contains ``emb_name`` is perturbed.
        epsilon: the L2 norm of the perturbation of each matched parameter; 0 disables the attack.
        emb_name: substring of the embedding parameter names (``"word_embeddings"`` for BERT-style models).

    Example (a hand-written loop)::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> fgm = FGM(model, epsilon=1.0, emb_name="0.weight")
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> loss_fn = lambda: nn.functional.cross_entropy(model(x), y)
        >>> before = model[0].weight.detach().clone()
        >>> loss_fn().backward()                      # clean gradient
        >>> adv_loss = fgm.attack_backward(loss_fn)   # adds the gradient at the perturbed embedding
        >>> bool(torch.equal(model[0].weight, before))  # restored exactly
        True
    """

    name = "fgm"

    def __init__(self, model: nn.Module, epsilon: float = 1.0, emb_name: str = "word_embeddings") -> None:
        self.check_arguments(type(self).__name__, epsilon, emb_name)
        super().__init__(model, select_trainable(model, emb_name, owner=type(self).__name__, argument="emb_name", hint="embed"))
        self.epsilon = float(epsilon)
        self.stats: Dict[str, torch.Tensor] = {}
        """What the last attack measured, as 0-d tensors on the device: ``grad_norm``, the L2 norm of the clean
        gradient of the matched parameters (all together) that the direction came from."""

    @staticmethod
    def check_arguments(owner: str, epsilon: float, emb_name: str) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, epsilon=epsilon)
        check_pattern(owner, "emb_name", emb_name)

    def enabled(self) -> bool:
        return self.epsilon != 0

    def run(self, step: AttackStep) -> Outcome:
        return self._passes(step, 1)

    def perturb(self, snapshot: Snapshot, regions: Regions, pass_index: int) -> torch.Tensor:
        grad_norms = norms(regions.grads)
        self.stats["grad_norm"] = torch.linalg.vector_norm(grad_norms)
        finite = torch.isfinite(grad_norms).all()
        torch._foreach_add_(regions.weights, scaled_steps(regions.grads, self.epsilon, finite, grad_norms))
        return finite
