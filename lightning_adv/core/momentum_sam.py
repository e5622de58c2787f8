"""Momentum-SAM (Becker et al., 2023; MarlonBecker/MSAM ``optimizer/adamW_msam.py``, ``optimizer/msam.py``): the
clean pass itself runs at weights moved by ``-rho * m / ||m||`` along the optimizer's own momentum, so the
sharpness-aware gradient costs no extra pass. A method on the engine's contract (``combine = "extend_loss"``: it
changes the clean pass and runs no pass of its own): no line of the engine knows it."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from lightning_adv.core.checks import check_non_negative
from lightning_adv.core.method import Method
from lightning_adv.core.snapshot import norms
from lightning_adv.core.step import AttackStep, Outcome

_BUFFERS = ("exp_avg", "momentum_buffer")  # Adam, AdamW, NAdam, RAdam, Adamax...; SGD with momentum


def momentum_of(optimizer: torch.optim.Optimizer) -> str:
    """The name of the optimizer's momentum state, or ``ValueError`` naming the fix when it keeps none."""
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        if "betas" in group:
            if float(group["betas"][0]) <= 0:
                break
            return "exp_avg"
        if "momentum" in group:
            if float(group["momentum"]) <= 0:
                break
            return "momentum_buffer"
    raise ValueError(
        f"MomentumSAM needs an optimizer that keeps a momentum (torch.optim.SGD(momentum > 0), Adam or AdamW with "
        f"betas[0] > 0); {name} with {_describe(optimizer)} keeps none. Use such an optimizer, or SAM (one extra pass)."
    )


def _describe(optimizer: torch.optim.Optimizer) -> str:
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    shown = {k: group[k] for k in ("momentum", "betas") if k in group}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "no momentum setting"


class MomentumSAM(Method):
    """The clean forward and backward at ``w - rho * m / (||m|| + 1e-12)``, ``m`` the optimizer's momentum (``exp_avg``
    of Adam/AdamW, ``momentum_buffer`` of SGD), the norm over every parameter together; the weights are restored
    exactly after the clean backward, before ``optimizer.step`` (and on any exception), so a checkpoint never holds
    perturbed weights. No momentum yet (the first step): no perturbation, as in the source. The perturbed weights are
    new tensors the parameters point at while the clean pass runs: no copy of the weights is taken, their own tensors
    are put back. With gradients that are views (FSDP, whose parameters are views into its flat parameters) the weights
    are moved in place instead and restored from a copy, the norm of the momentum summed over the shards.

    Composes with the methods that change the clean pass (R3F, SMART, NEFTune); with a method that runs passes after
    the backward it is refused: those passes would run at perturbed weights or not depending on the order.

    Args:
        model: the model; the parameters the optimizer holds momentum for are perturbed.
        optimizer: the optimizer whose momentum gives the direction.
        rho: the radius of the perturbation (>= 0); 0 disables it.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import adversarial_backward
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> msam = MomentumSAM(model, opt, rho=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> for _ in range(2):
        ...     _ = adversarial_backward(model, [msam], lambda: nn.functional.cross_entropy(model(x), y))
        ...     opt.step(); opt.zero_grad()
        >>> round(float(msam.last_shift), 6)   # the second step ran at weights moved by rho
        0.1
    """

    name = "msam"
    combine = "extend_loss"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rho: float = 0.3) -> None:
        super().__init__()
        check_non_negative(type(self).__name__, rho=rho)
        self.buffer = momentum_of(optimizer)
        self.model, self.optimizer, self.rho = model, optimizer, float(rho)
        self.last_shift: Optional[torch.Tensor] = None
        """The norm of the last perturbation (``rho``, or 0 before the first momentum)."""
        self._moved: List[torch.Tensor] = []
        self._saved: List[torch.Tensor] = []
        self._in_place = False  # FSDP: the weights moved in place, ``_saved`` their copies

    def enabled(self) -> bool:
        return self.rho != 0

    def describe(self) -> str:
        return f"the weights along {type(self.optimizer).__name__}'s {self.buffer}"

    def perturbs(self) -> frozenset:
        return frozenset(id(p) for group in self.optimizer.param_groups for p in group["params"])

    def compose(self, others: Sequence[Any]) -> None:
        passes = [type(m).__name__ for m in others if m.combine != "extend_loss"]
        if passes:
            raise ValueError(
                f"MomentumSAM with {', '.join(passes)} is not supported: their passes after the backward would run at the "
                "momentum-perturbed weights or at the clean ones depending on the order. Combine it with R3F, SMART or "
                "NEFTune (they change the clean pass), or use SAM."
            )

    def prepare(self, step: AttackStep) -> None:
        params, buffers = [], []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                buf = self.optimizer.state.get(p, {}).get(self.buffer)
                if buf is not None and p.requires_grad:
                    params.append(p)
                    buffers.append(buf)
        if not params and not step.grads_are_views:
            self.last_shift = torch.zeros(())
            return
        with torch.no_grad():
            local = torch.linalg.vector_norm(norms(buffers)) if buffers else torch.zeros((), device=self._device())
            total = step.norm_over_shards(local)  # FSDP: the momentum is sharded as the parameters are
            scale = -self.rho / (total + 1e-12)
            self.last_shift = self.rho * total / (total + 1e-12)
            if step.grads_are_views:
                # FSDP: the parameters are views into its flat parameters, which only change in place: moved in place,
                # a copy of the weights saved, copied back after the backward (exact)
                weights = [p.detach() for p in params]
                self._moved, self._saved = params, [w.clone() for w in weights]
                if weights:
                    torch._foreach_addcmul_(weights, buffers, [scale.to(buffers[0].dtype)] * len(weights))
                self._in_place = True
                return
            # w - rho * m / ||m|| in one pass over the weights and the momentum (new tensors, beside the saved weights);
            # the scale stays a tensor: no host-device synchronisation
            moved = torch._foreach_addcmul([p.detach() for p in params], buffers, [scale.to(buffers[0].dtype)] * len(params))
        # the parameters point at the perturbed weights; their own tensors are kept and put back as they are: an exact
        # restore without a copy of the weights (the forward and the backward run between the two swaps)
        self._moved, self._saved = params, [p.data for p in params]
        for p, w in zip(params, moved):
            p.data = w if w.dtype == p.dtype else w.to(p.dtype)

    def _device(self) -> torch.device:
        return next((p.device for group in self.optimizer.param_groups for p in group["params"]), torch.device("cpu"))

    def run(self, step: AttackStep) -> Outcome:
        self._restore()
        return Outcome(None, torch.zeros((), dtype=torch.bool))

    def finish(self) -> None:
        self._restore()

    def _restore(self) -> None:
        params, saved, self._moved, self._saved = self._moved, self._saved, [], []
        if self._in_place:
            self._in_place = False
            if params:
                with torch.no_grad():
                    torch._foreach_copy_([p.detach() for p in params], saved)
            return
        for p, w in zip(params, saved):
            p.data = w


__all__ = ["MomentumSAM", "momentum_of"]
