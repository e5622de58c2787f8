"""R3FCallback: the R3F smoothness regulariser for any LightningModule that returns its logits."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt
from lightning_adv.core.r3f import R3F


class R3FCallback(AdversarialCallback):
    """Adds r3f_lambda times the symmetric KL between the logits at clean and noisy embeddings to every loss.

    The loss becomes ``loss + r3f_lambda * symmetric_KL(f(x), f(x + noise))``.

    The noise (``U(-eps, eps)`` or ``N(0, eps)``) goes on the input-embedding output of the real tokens
    (:class:`~lightning_adv.core.R3F`, after fairseq ``examples/rxf``). The module's ``training_step`` must
    return ``{"loss": loss, "logits": logits}``. Costs one extra forward and its backward; the clean forward
    is not repeated. Logs ``adv/r3f_loss`` (the symmetric KL) and the counters.

    Args:
        eps: noise magnitude (>= 0).
        r3f_lambda: weight of the regulariser (>= 0).
        noise_type: "uniform" or "normal".
        start_epoch: first epoch (counted from 0) that is regularised.
        embedding: dotted path of the input-embedding module; by default that of the first transformers model.
        start_step: first optimizer step (counted from 0, over the run) that is attacked.
        seed: seed of the callback's own random generator (its noise), saved in checkpoints so that a resumed
            run draws what an uninterrupted one would; None: from seed_everything (or torch's initial seed).

    Example::

        >>> import torch, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import R3FCallback
        >>> class Tokens(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(10, 32)
        ...     def training_step(self, batch, batch_idx):
        ...         ids = (batch.abs() * 10).long().clamp(max=9)[:, :4]
        ...         logits = self.layer(self.emb(ids).mean(1))
        ...         return {"loss": logits.logsumexp(-1).mean(), "logits": logits}
        >>> r3f = R3FCallback(eps=1e-3, embedding="emb")
        >>> trainer = L.Trainer(max_steps=2, callbacks=[r3f], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Tokens())
        >>> r3f.attacks
        2
    """

    supports_fsdp = True  # perturbs the embedding output: tests/test_fsdp.py
    supports_fsdp_accumulation = True  # also with several processes: tests/test_fsdp.py

    def __init__(
        self,
        eps: NonNegativeFloat = 1e-5,
        r3f_lambda: NonNegativeFloat = 1.0,
        noise_type: Literal["uniform", "normal"] = "uniform",
        start_epoch: NonNegativeInt = 0,
        embedding: Optional[str] = None,
        start_step: NonNegativeInt = 0,
        seed: Optional[NonNegativeInt] = None,
    ) -> None:
        R3F.check_arguments(type(self).__name__, eps, r3f_lambda, noise_type, embedding)
        super().__init__(start_epoch=start_epoch, start_step=start_step, seed=seed)
        self.eps, self.r3f_lambda, self.noise_type, self.embedding = eps, r3f_lambda, noise_type, embedding

    def target_key(self) -> Dict[str, Any]:
        return {"embedding": self.embedding}

    def build_method(self, pl_module: nn.Module) -> R3F:
        return R3F(pl_module, eps=self.eps, r3f_lambda=self.r3f_lambda, noise_type=self.noise_type, embedding=self.embedding)
