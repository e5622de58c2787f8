"""RDropCallback: R-Drop (two dropout masks, averaged losses, symmetric KL) for any LightningModule that returns its logits."""

from __future__ import annotations

from typing import Any, Dict, Literal

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt
from lightning_adv.core.rdrop import RDrop


class RDropCallback(AdversarialCallback):
    """R-Drop: a second forward of each batch with another dropout mask; the loss becomes the mean of the two losses
    plus alpha times their symmetric KL.

    The loss becomes ``0.5 * (loss_1 + loss_2) + alpha * (KL(p_1 || p_2) + KL(p_2 || p_1)) / 2``
    (:class:`~lightning_adv.core.RDrop`, after dropreg/R-Drop ``compute_kl_loss``, summed over the batch as there).
    The module's ``training_step`` must return ``{"loss": loss, "logits": logits}``. Costs one extra forward and its
    backward; the clean forward is not repeated. Dropout must be on: the callback warns when the model is in eval mode
    at the start of training (transformers' ``from_pretrained`` returns it so, and Lightning keeps it). Logs
    ``adv/rdrop_loss`` (the symmetric KL, before alpha), ``adv/rdrop_second_loss`` and the counters.

    Args:
        alpha: weight of the symmetric KL (>= 0); with reduction "sum" its effect grows with the batch size.
        reduction: "sum" (the source's: summed over the examples) or "batchmean" (divided by the batch size).
        start_epoch: first epoch (counted from 0) that is regularised.
        start_step: first optimizer step (counted from 0, over the run) that is regularised.

    Example::

        >>> import torch, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import RDropCallback
        >>> class Dropped(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.drop = torch.nn.Dropout(0.1)
        ...     def training_step(self, batch, batch_idx):
        ...         logits = self.layer(self.drop(batch))
        ...         return {"loss": logits.logsumexp(-1).mean(), "logits": logits}
        >>> rdrop = RDropCallback(alpha=1.0)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[rdrop], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Dropped())
        >>> rdrop.attacks
        2
    """

    supports_fsdp = True  # tests/test_fsdp.py
    supports_fsdp_accumulation = True  # its second forward joins the clean backward, as R3F's (tested with 2 processes)

    def __init__(
        self,
        alpha: NonNegativeFloat = 1.0,
        reduction: Literal["sum", "batchmean"] = "sum",
        start_epoch: NonNegativeInt = 0,
        start_step: NonNegativeInt = 0,
    ) -> None:
        RDrop.check_arguments(type(self).__name__, alpha, reduction)
        super().__init__(start_epoch=start_epoch, start_step=start_step)
        self.alpha, self.reduction = alpha, reduction

    def target_key(self) -> Dict[str, Any]:
        return {}

    def build_method(self, pl_module: nn.Module) -> RDrop:
        method = RDrop(pl_module, alpha=self.alpha, reduction=self.reduction)
        if not method.dropout_paths:
            rank_zero_warn(
                f"{type(self).__name__}: {type(pl_module).__name__} holds no dropout module (torch.nn.Dropout and its "
                "variants), so both passes may draw the same output: R-Drop would then only double the cost. Add "
                "dropout to the model (transformers: hidden_dropout_prob > 0), or ignore this if the model applies "
                "dropout functionally (F.dropout).",
                category=UserWarning,
            )
        return method
