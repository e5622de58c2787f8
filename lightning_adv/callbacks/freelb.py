"""FreeLBCallback: FreeLB on the per-example embedding outputs, for any LightningModule."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from torch import nn

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning_adv.core.freelb import FreeLB


class FreeLBCallback(AdversarialCallback):
    """FreeLB: ascent on a per-example perturbation of the embedding outputs, every pass's gradient accumulated.

    The clean pass of each micro-batch runs at ``delta0`` (random, per example, on the real tokens; 0 when
    ``adv_init_mag`` is 0), then ``adv_steps`` ascent passes; every pass's loss is weighted
    ``1 / (1 + adv_steps)`` (:class:`~lightning_adv.core.FreeLB`, after ``freelb_train_step`` of
    zhuchen03/FreeLB). The perturbation lives in the activations, so frozen (PEFT/LoRA), tied (GPT-2, T5) and
    ``configure_model`` embeddings work. Costs ``adv_steps`` passes. Logs ``adv/freelb_loss`` and the counters.

    Args:
        adv_lr: ascent step size (>= 0).
        adv_steps: ascent passes after the clean one (>= 1).
        adv_init_mag: magnitude of the random start (>= 0).
        adv_max_norm: bound of the perturbation per example (>= 0; 0: unbounded).
        norm_type: "l2" or "linf".
        start_epoch: first epoch (counted from 0) that is attacked.
        embedding: dotted path of the input-embedding module in the LightningModule; by default the
            get_input_embeddings() of its first transformers model.
        start_step: first optimizer step (counted from 0, over the run) that is attacked.
        seed: seed of the callback's own random generator (its noise), saved in checkpoints so that a resumed
            run draws what an uninterrupted one would; None: from seed_everything (or torch's initial seed).

    Example::

        >>> import torch, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import FreeLBCallback
        >>> class Tokens(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(10, 32)
        ...     def training_step(self, batch, batch_idx):
        ...         ids = (batch.abs() * 10).long().clamp(max=9)[:, :4]
        ...         return self.layer(self.emb(ids).mean(1)).sum()
        >>> freelb = FreeLBCallback(adv_steps=2, embedding="emb")
        >>> trainer = L.Trainer(max_steps=2, callbacks=[freelb], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Tokens())
        >>> freelb.attacks
        2
    """

    supports_fsdp = True  # perturbs the embedding output: tests/test_fsdp.py
    supports_fsdp_accumulation = True  # also with several processes: tests/test_fsdp.py

    def __init__(
        self,
        adv_lr: NonNegativeFloat = 0.1,
        adv_steps: PositiveInt = 2,
        adv_init_mag: NonNegativeFloat = 0.6,
        adv_max_norm: NonNegativeFloat = 0.0,
        norm_type: Literal["l2", "linf"] = "l2",
        start_epoch: NonNegativeInt = 0,
        embedding: Optional[str] = None,
        start_step: NonNegativeInt = 0,
        seed: Optional[NonNegativeInt] = None,
    ) -> None:
        FreeLB.check_arguments(type(self).__name__, adv_lr, adv_steps, adv_init_mag, adv_max_norm, norm_type, embedding)
        super().__init__(start_epoch=start_epoch, start_step=start_step, seed=seed)
        self.adv_lr, self.adv_steps, self.adv_init_mag = adv_lr, adv_steps, adv_init_mag
        self.adv_max_norm, self.norm_type, self.embedding = adv_max_norm, norm_type, embedding

    def target_key(self) -> Dict[str, Any]:
        return {"embedding": self.embedding}

    def build_method(self, pl_module: nn.Module) -> FreeLB:
        return FreeLB(pl_module, adv_lr=self.adv_lr, adv_steps=self.adv_steps, adv_init_mag=self.adv_init_mag,
                      adv_max_norm=self.adv_max_norm, norm_type=self.norm_type, embedding=self.embedding)
