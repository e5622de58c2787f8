"""FGMCallback: the Fast Gradient Method on word embeddings, for any automatic-optimization LightningModule."""

from __future__ import annotations

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.fgm import FGM, check_non_negative


class FGMCallback(AdversarialCallback):
    """Adds the gradient at adversarially perturbed embeddings to every training micro-batch's gradient.

    After the clean backward, every trainable parameter whose name contains ``emb_name`` is moved by
    ``epsilon * g / ||g||`` (``g``: this micro-batch's own gradient), the loss is computed again and
    backpropagated, and the parameters are restored exactly. Logs ``adv/fgm_loss``, ``adv/fgm_attacks``
    and ``adv/fgm_skipped``.

    Args:
        epsilon: L2 norm of the perturbation of each embedding matrix (>= 0).
        emb_name: substring of the names of the embedding parameters to perturb
            (``"word_embeddings"`` for BERT-family models from ``transformers``).
        start_epoch: first epoch (counted from 0) that is attacked.

    Example::

        >>> import torch, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import FGMCallback
        >>> fgm = FGMCallback(epsilon=0.5, emb_name="layer")
        >>> trainer = L.Trainer(max_steps=3, callbacks=[fgm], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> fgm.attacks
        3
    """

    log_name = "fgm"

    def __init__(self, epsilon: float = 1.0, emb_name: str = "word_embeddings", start_epoch: int = 0) -> None:
        check_non_negative(type(self).__name__, epsilon=epsilon)
        super().__init__(start_epoch=start_epoch)
        self.epsilon = epsilon
        self.emb_name = emb_name

    def build_attack(self, pl_module: nn.Module) -> FGM:
        try:
            return FGM(pl_module, epsilon=self.epsilon, emb_name=self.emb_name)
        except ValueError as err:
            raise ValueError(str(err).replace("FGM(", "FGMCallback(", 1)) from None
