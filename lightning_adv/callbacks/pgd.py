"""PGDCallback: projected gradient ascent on the embedding weights, for any LightningModule."""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, ParameterPattern, PositiveInt
from lightning_adv.core.pgd import PGD


class PGDCallback(AdversarialCallback):
    """Adds the gradient at the end of a projected ascent of several passes on the embedding weights.

    The competition PGD (fyubang's snippet, bert4torch): each pass moves the matched weights by
    ``alpha * g / ||g||_F`` and projects them into the Frobenius ball of radius ``epsilon`` around the clean
    weights; the gradient of the last pass is added to the clean one (:class:`~lightning_adv.core.PGD`).
    Costs ``steps`` forward and backward passes. Logs ``adv/pgd_loss``, ``adv/pgd_attacks``, ``adv/pgd_skipped``.

    Args:
        epsilon: radius of the ball (>= 0).
        alpha: step size of each pass (>= 0; 0 disables the attack).
        steps: number of adversarial passes (>= 1).
        emb_name: substring of the names of the embedding parameters to perturb.
        start_epoch: first epoch (counted from 0) that is attacked.
        start_step: first optimizer step (counted from 0, over the run) that is attacked.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import PGDCallback
        >>> pgd = PGDCallback(epsilon=1.0, alpha=0.3, steps=3, emb_name="layer")
        >>> trainer = L.Trainer(max_steps=2, callbacks=[pgd], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> pgd.attacks
        2
    """

    def __init__(
        self, epsilon: NonNegativeFloat = 1.0, alpha: NonNegativeFloat = 0.3, steps: PositiveInt = 3,
        emb_name: ParameterPattern = "word_embeddings", start_epoch: NonNegativeInt = 0,
        start_step: NonNegativeInt = 0,
    ) -> None:
        PGD.check_arguments(type(self).__name__, epsilon, alpha, steps, emb_name)
        super().__init__(start_epoch=start_epoch, start_step=start_step)
        self.epsilon, self.alpha, self.steps, self.emb_name = epsilon, alpha, steps, emb_name

    def target_key(self) -> Dict[str, Any]:
        return {"emb_name": self.emb_name}

    def build_method(self, pl_module: nn.Module) -> PGD:
        return PGD(pl_module, epsilon=self.epsilon, alpha=self.alpha, steps=self.steps, emb_name=self.emb_name)
