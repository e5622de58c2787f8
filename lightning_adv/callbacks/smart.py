"""SMARTCallback: smoothness-inducing adversarial regularisation for any LightningModule that returns its logits."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning_adv.core.smart import SMART


class SMARTCallback(AdversarialCallback):
    """Adds adv_alpha times the symmetric KL between the logits at the embeddings and at adversarial ones to every loss.

    The loss becomes ``loss + adv_alpha * symmetric_KL(f(x), f(x + delta))``, with ``delta``
    found by ``steps`` ascent steps on the input-embedding output (:class:`~lightning_adv.core.SMART`, after
    mt-dnn ``SmartPerturbation``). The module's ``training_step`` must return ``{"loss": loss, "logits": logits}``.
    Costs about two passes with ``steps=1``. Logs ``adv/smart_loss`` (the symmetric KL) and the counters.

    Args:
        adv_alpha: weight of the regulariser (>= 0).
        step_size: ascent step size (>= 0).
        noise_var: scale of the initial Gaussian noise (>= 0).
        epsilon: guard of the per-token normalisation (>= 0).
        steps: ascent steps (>= 1).
        norm: per-token normalisation, "inf", "l2" or "l1".
        start_epoch: first epoch (counted from 0) that is regularised.
        embedding: dotted path of the input-embedding module; by default that of the first transformers model.
        start_step: first optimizer step (counted from 0, over the run) that is attacked.
        seed: seed of the callback's own random generator (its noise), saved in checkpoints so that a resumed
            run draws what an uninterrupted one would; None: from seed_everything (or torch's initial seed).

    Example::

        >>> import torch, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import SMARTCallback
        >>> class Tokens(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(10, 32)
        ...     def training_step(self, batch, batch_idx):
        ...         ids = (batch.abs() * 10).long().clamp(max=9)[:, :4]
        ...         logits = self.layer(self.emb(ids).mean(1))
        ...         return {"loss": logits.logsumexp(-1).mean(), "logits": logits}
        >>> smart = SMARTCallback(embedding="emb")
        >>> trainer = L.Trainer(max_steps=2, callbacks=[smart], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Tokens())
        >>> smart.attacks
        2
    """

    supports_fsdp = True  # perturbs the embedding output: tests/test_fsdp.py
    supports_fsdp_mixed_precision = False  # its ascent's own backward: see AdversarialCallback

    def __init__(
        self,
        adv_alpha: NonNegativeFloat = 1.0,
        step_size: NonNegativeFloat = 1e-3,
        noise_var: NonNegativeFloat = 1e-5,
        epsilon: NonNegativeFloat = 1e-6,
        steps: PositiveInt = 1,
        norm: Literal["inf", "l2", "l1"] = "inf",
        start_epoch: NonNegativeInt = 0,
        embedding: Optional[str] = None,
        start_step: NonNegativeInt = 0,
        seed: Optional[NonNegativeInt] = None,
    ) -> None:
        SMART.check_arguments(type(self).__name__, adv_alpha, step_size, noise_var, epsilon, steps, norm, embedding)
        super().__init__(start_epoch=start_epoch, start_step=start_step, seed=seed)
        self.adv_alpha, self.step_size, self.noise_var, self.epsilon = adv_alpha, step_size, noise_var, epsilon
        self.steps, self.norm, self.embedding = steps, norm, embedding

    def target_key(self) -> Dict[str, Any]:
        return {"embedding": self.embedding}

    def build_method(self, pl_module: nn.Module) -> SMART:
        return SMART(pl_module, adv_alpha=self.adv_alpha, step_size=self.step_size, noise_var=self.noise_var,
                     epsilon=self.epsilon, steps=self.steps, norm=self.norm, embedding=self.embedding)
