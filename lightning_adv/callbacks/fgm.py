"""FGMCallback: the Fast Gradient Method on word embeddings, for any LightningModule."""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, ParameterPattern
from lightning_adv.core.fgm import FGM


class FGMCallback(AdversarialCallback):
    """Adds the gradient at adversarially perturbed embeddings to every training micro-batch's gradient.

    After the clean backward, every trainable parameter whose name contains ``emb_name`` is moved by
    ``epsilon * g / ||g||`` (``g``: this micro-batch's own clean gradient), the loss is computed again and
    backpropagated, and the parameters are restored exactly (:class:`~lightning_adv.core.FGM`). Logs
    ``adv/fgm_loss``, ``adv/fgm_attacks`` and ``adv/fgm_skipped``.

    Args:
        epsilon: L2 norm of the perturbation of each embedding matrix (>= 0; 0 disables the attack).
        emb_name: substring of the names of the embedding parameters to perturb
            ("word_embeddings" for BERT-family models from transformers).
        start_epoch: first epoch (counted from 0) that is attacked.
        start_step: first optimizer step (counted from 0, over the run) that is attacked.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import FGMCallback
        >>> fgm = FGMCallback(epsilon=0.5, emb_name="layer")
        >>> trainer = L.Trainer(max_steps=3, callbacks=[fgm], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> fgm.attacks
        3
    """

    def __init__(self, epsilon: NonNegativeFloat = 1.0, emb_name: ParameterPattern = "word_embeddings", start_epoch: NonNegativeInt = 0,
        start_step: NonNegativeInt = 0,
    ) -> None:
        FGM.check_arguments(type(self).__name__, epsilon, emb_name)
        super().__init__(start_epoch=start_epoch, start_step=start_step)
        self.epsilon = epsilon
        self.emb_name = emb_name

    def target_key(self) -> Dict[str, Any]:
        return {"emb_name": self.emb_name}

    def build_method(self, pl_module: nn.Module) -> FGM:
        return FGM(pl_module, epsilon=self.epsilon, emb_name=self.emb_name)
