"""SAM and ASAM (Foret et al., ICLR 2021; Kwon et al., ICML 2021), in the form of davda54/sam ``sam.py``: one pass
at weights moved up the clean gradient, whose gradient replaces the clean one. A method on the engine's contract
(``combine = "replace"``): no line of the engine knows it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lightning_adv.core.checks import check_non_negative
from lightning_adv.core.method import ParameterMethod
from lightning_adv.core.snapshot import Regions, Snapshot, norms, zero_nonfinite
from lightning_adv.core.step import AttackStep, Outcome


class SAM(ParameterMethod):
    """Sharpness-aware minimisation: ``e = rho * g / (||g|| + 1e-12)`` (ASAM with ``adaptive``:
    ``rho * w^2 * g / (||w * g|| + 1e-12)``), the norm taken over every trainable parameter together; one pass at
    ``w + e``, whose gradient replaces the micro-batch's clean gradient; the weights are restored exactly. A
    non-finite gradient norm leaves the weights unperturbed. With gradient accumulation each micro-batch is perturbed
    from its own clean gradient (as AWP), the semantics of davda54/sam's loop run on each micro-batch.

    Args:
        model: the model; every trainable parameter is perturbed.
        rho: the radius of the perturbation (>= 0); 0 disables it.
        adaptive: ASAM's scale-invariant perturbation.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> (outcome,) = adversarial_backward(model, [SAM(model, rho=0.5)], lambda: nn.functional.cross_entropy(model(x), y))
        >>> bool(outcome.loss > nn.functional.cross_entropy(model(x), y))   # the loss at w + e is higher
        True
    """

    name = "sam"
    combine = "replace"
    sharded_gradient = True  # elementwise, and one norm over all parameters: it runs on FSDP's gradient shards

    def __init__(self, model: nn.Module, rho: float = 0.05, adaptive: bool = False) -> None:
        check_non_negative(type(self).__name__, rho=rho)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(self).__name__}: {type(model).__name__} has no trainable parameter to perturb.")
        super().__init__(model, named)
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self._grad_scale = 1.0
        self._norm: Callable[[torch.Tensor], torch.Tensor] = lambda local: local

    def enabled(self) -> bool:
        return self.rho != 0

    def describe(self) -> str:
        return ("ASAM: " if self.adaptive else "") + super().describe()

    def run(self, step: AttackStep) -> Outcome:
        self._grad_scale, self._norm = step.grad_scale, step.norm_over_shards
        return self._passes(step, 1, writable=True)

    def perturb(self, snapshot: Snapshot, regions: Regions, pass_index: int) -> torch.Tensor:
        steps = regions.grads  # scratch: the pass discards them
        if self.adaptive:
            torch._foreach_mul_(steps, regions.weights)  # w * g: its norm is ASAM's
        local = torch.linalg.vector_norm(norms(steps)) if steps else torch.zeros((), device=self._device(snapshot))
        total = self._norm(local) * self._grad_scale  # over every process's shard under FSDP
        finite = torch.isfinite(total)
        scale = torch.where(finite, self.rho * self._grad_scale / (total + 1e-12), 0.0)
        if self.adaptive:
            torch._foreach_mul_(steps, regions.weights)  # w^2 * g
        zero_nonfinite(steps, finite)  # inf * 0 would be nan: an unusable gradient leaves the weights as they are
        if steps:
            torch._foreach_addcmul_(regions.weights, steps, [scale.to(steps[0].dtype)] * len(steps))  # w += scale * g
        return finite

    @staticmethod
    def _device(snapshot: Snapshot) -> torch.device:
        return snapshot.params[0].device if snapshot.params else torch.device("cpu")


__all__ = ["SAM"]
