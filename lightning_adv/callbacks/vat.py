"""VATCallback: virtual adversarial training in bert4torch's form for any LightningModule that returns its logits."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt
from lightning_adv.core.vat import VAT


class VATCallback(AdversarialCallback):
    """Adds adv_alpha times the symmetric KL between the logits at the embeddings and at virtual-adversarial ones, as
    bert4torch's VAT does.

    The loss becomes ``loss + adv_alpha * (KL(p || p_adv) + KL(p_adv || p))``, summed over the batch, with the
    perturbation found by one ascent step on ``KL(p || p_adv)`` from ``N(0, 1) * noise_var`` noise on the
    input-embedding output, normalised per token (:class:`~lightning_adv.core.VAT`, after ``bert4torch/callbacks.py``
    ``VAT``; the argument names are bert4torch's). The module's ``training_step`` must return
    ``{"loss": loss, "logits": logits}``. Costs two extra forwards, the backward to the noise and the backward of the
    perturbed forward; the clean forward is not repeated. Logs ``adv/vat_loss`` (the symmetric KL) and the counters.

    Args:
        adv_alpha: weight of the regulariser (>= 0); bert4torch: 1 for fine-tuning, 10 for pre-training.
        adv_step_size: ascent step size (>= 0).
        noise_var: standard deviation of the initial Gaussian noise (>= 0).
        noise_gamma: guard of the per-token normalisation (>= 0).
        norm_type: per-token normalisation, "l2", "inf" or "l1".
        start_epoch: first epoch (counted from 0) that is regularised.
        embedding: dotted path of the input-embedding module; by default that of the first transformers model.
        start_step: first optimizer step (counted from 0, over the run) that is attacked.
        seed: seed of the callback's own random generator (its noise), saved in checkpoints so that a resumed
            run draws what an uninterrupted one would; None: from seed_everything (or torch's initial seed).

    Example::

        >>> import torch, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import VATCallback
        >>> class Tokens(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(10, 32)
        ...     def training_step(self, batch, batch_idx):
        ...         ids = (batch.abs() * 10).long().clamp(max=9)[:, :4]
        ...         logits = self.layer(self.emb(ids).mean(1))
        ...         return {"loss": logits.logsumexp(-1).mean(), "logits": logits}
        >>> vat = VATCallback(embedding="emb")
        >>> trainer = L.Trainer(max_steps=2, callbacks=[vat], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Tokens())
        >>> vat.attacks
        2
    """

    supports_fsdp = True  # tests/test_fsdp.py
    #: its ascent takes a backward of its own before the clean one (SMART's): FSDP frees its low-precision parameters
    supports_fsdp_mixed_precision = False

    def __init__(
        self,
        adv_alpha: NonNegativeFloat = 1.0,
        adv_step_size: NonNegativeFloat = 1e-3,
        noise_var: NonNegativeFloat = 1e-5,
        noise_gamma: NonNegativeFloat = 1e-6,
        norm_type: Literal["l2", "inf", "l1"] = "l2",
        start_epoch: NonNegativeInt = 0,
        embedding: Optional[str] = None,
        start_step: NonNegativeInt = 0,
        seed: Optional[NonNegativeInt] = None,
    ) -> None:
        VAT.check_arguments(type(self).__name__, adv_alpha, adv_step_size, noise_var, noise_gamma, norm_type, embedding)
        super().__init__(start_epoch=start_epoch, start_step=start_step, seed=seed)
        self.adv_alpha, self.adv_step_size, self.noise_var = adv_alpha, adv_step_size, noise_var
        self.noise_gamma, self.norm_type, self.embedding = noise_gamma, norm_type, embedding

    def target_key(self) -> Dict[str, Any]:
        return {"embedding": self.embedding}

    def build_method(self, pl_module: nn.Module) -> VAT:
        return VAT(pl_module, adv_alpha=self.adv_alpha, adv_step_size=self.adv_step_size, noise_var=self.noise_var,
                   noise_gamma=self.noise_gamma, norm_type=self.norm_type, embedding=self.embedding)
