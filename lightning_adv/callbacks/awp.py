"""AWPCallback: Adversarial Weight Perturbation for any LightningModule."""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.awp import AWP
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, ParameterPattern, PositiveInt


class AWPCallback(AdversarialCallback):
    """Replaces every training micro-batch's gradient by the gradient at adversarially perturbed weights.

    After the clean backward, each trainable parameter whose name contains ``adv_param`` moves by
    ``adv_lr * g / (||g|| + 1e-6) * (||w|| + 1e-6)``, each element kept within ``adv_eps * |w|`` of its
    saved value, for ``adv_step`` passes; the micro-batch's gradient is replaced by the one of the last
    pass and the weights are restored exactly (:class:`~lightning_adv.core.AWP`). Gradients of earlier
    micro-batches (accumulation) are kept. AWP is usually started once the model is past a warm-up
    (``start_epoch=1``, or ``start_step``): from a random head it can push training into a single class.
    Logs ``adv/awp_loss``, ``adv/awp_attacks`` and ``adv/awp_skipped``.

    Args:
        adv_param: substring of the names of the parameters to perturb.
        adv_lr: step size relative to the weight norm (>= 0); 0 disables the attack.
        adv_eps: bound of each element's perturbation relative to its absolute value (>= 0).
        start_epoch: first epoch (counted from 0) that is attacked.
        adv_step: number of adversarial passes (>= 1).
        start_step: first optimizer step (counted from 0, over the run) that is attacked.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import AWPCallback
        >>> awp = AWPCallback(adv_lr=1.0, adv_eps=0.01, adv_step=2)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[awp], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> awp.attacks
        2
    """

    def __init__(
        self, adv_param: ParameterPattern = "weight", adv_lr: NonNegativeFloat = 1.0, adv_eps: NonNegativeFloat = 0.2,
        start_epoch: NonNegativeInt = 0, adv_step: PositiveInt = 1, start_step: NonNegativeInt = 0
    ) -> None:
        AWP.check_arguments(type(self).__name__, adv_param, adv_lr, adv_eps, adv_step)
        super().__init__(start_epoch=start_epoch, start_step=start_step)
        self.adv_param, self.adv_lr, self.adv_eps, self.adv_step = adv_param, adv_lr, adv_eps, adv_step

    def target_key(self) -> Dict[str, Any]:
        return {"adv_param": self.adv_param}

    def build_method(self, pl_module: nn.Module) -> AWP:
        return AWP(pl_module, adv_param=self.adv_param, adv_lr=self.adv_lr, adv_eps=self.adv_eps, adv_step=self.adv_step)
