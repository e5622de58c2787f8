"""What a pass returns and when DDP all-reduces: the small types the engine and the methods share."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import nn


class PassOutput(NamedTuple):
    """What one forward pass gave: the loss and, when the step returned them, the logits and the labels (a causal
    LM's token labels, -100 where masked: SMART and R3F then compare the logits per token over the labelled
    positions, see :func:`lightning_adv.core.smoothness.token_mask`)."""

    loss: torch.Tensor
    logits: Optional[torch.Tensor]
    labels: Optional[torch.Tensor] = None


class Outcome(NamedTuple):
    """What one method did in a micro-batch: its detached loss (``None`` when skipped) and a 0-d bool tensor
    that is True when the attack was skipped (a non-finite gradient, or a pass that returned no loss)."""

    loss: Optional[torch.Tensor]
    skipped: torch.Tensor


class SkipAttack(Exception):
    """Raised by :meth:`AttackStep.forward` when the step returned ``None`` (the module skipped the batch)."""


def pass_output(output: Any) -> Optional[PassOutput]:
    """Read a step's output: a loss tensor, a mapping with ``"loss"`` (and optionally ``"logits"``), or None."""
    if output is None:
        return None
    if isinstance(output, torch.Tensor):
        return PassOutput(output, None)
    if isinstance(output, Mapping) and "loss" in output:
        return None if output["loss"] is None else PassOutput(output["loss"], output.get("logits"), output.get("labels"))
    raise TypeError(
        "lightning_adv: an adversarial pass needs the loss; return a tensor or a dict with a 'loss' key "
        f"(and 'logits' for SMART/R3F, 'labels' for a causal LM's token labels), got {type(output).__name__}."
    )


def required_loss(output: Any, where: str) -> torch.Tensor:
    """The loss of a clean pass; ``ValueError`` naming ``where`` when the loss function returned None."""
    out = pass_output(output)
    if out is None:
        raise ValueError(f"{where}: loss_fn() returned None; it must return the loss of the batch.")
    return out.loss


class BackwardSync:
    """When DDP all-reduces: never for the clean or inner adversarial backward passes, once for the last one
    of the optimizer step. A no-op without a ``DistributedDataParallel`` module."""

    def __init__(self, ddp: Optional[nn.Module] = None, prepares: bool = True) -> None:
        self.ddp = ddp
        self.prepares = prepares
        self._original: Optional[bool] = None

    @property
    def world_size(self) -> int:
        group = getattr(self.ddp, "process_group", None)
        return group.size() if group is not None else 1

    def hold(self) -> None:
        if self.ddp is not None and self._original is None:
            self._original = bool(self.ddp.require_backward_grad_sync)
            self.ddp.require_backward_grad_sync = False

    def arm(self, sync: bool) -> None:
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = sync

    def prepare(self, output: Any) -> None:
        """Arm the reducer for a backward whose forward ran while the sync was held (as DDP's own forward does
        when syncing); a no-op without DDP, when not syncing, or when the driver's backward prepares it itself
        (Lightning's ``manual_backward``)."""
        ddp = self.ddp
        if ddp is None or not self.prepares or not torch.is_grad_enabled() or not ddp.require_backward_grad_sync:
            return
        from torch.nn.parallel.distributed import _find_tensors

        ddp.require_forward_param_sync = True
        args = list(_find_tensors(output)) if ddp.find_unused_parameters and not ddp.static_graph else []
        ddp.reducer._rebuild_buckets()
        ddp.reducer.prepare_for_backward(args)

    def release(self) -> None:
        if self.ddp is not None and self._original is not None:
            self.ddp.require_backward_grad_sync = self._original
        self._original = None
