"""NEFTuneCallback: noisy embeddings for fine-tuning, for any LightningModule."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from lightning.pytorch import LightningModule, Trainer

from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, check_choice, check_module_path, check_non_negative
from lightning_adv.core.neftune import NEFTune


class NEFTuneCallback(AdversarialCallback):
    """NEFTune: uniform noise U(-m, m), m = noise_alpha / sqrt(L * d), on the input-embedding output of every
    training forward (:class:`~lightning_adv.core.NEFTune`, after transformers' ``neftune_post_forward_hook``, which
    TRL inherits); no extra pass. ``length="padded"`` (the source's): ``L`` is the padded length; ``"tokens"``: each
    example's number of real tokens, padding left without noise (the source's open bug, transformers issue 34659),
    and for packed sequences (``position_ids`` restarting at 0) each packed example's own number of tokens.
    The hook lives only inside each training step (never at validation, after ``fit`` or after an exception), and a
    model that already carries transformers' NEFTune hook is refused (the noise would be added twice, TRL issue
    1766). Counts the noised micro-batches; logs no loss.

    Args:
        noise_alpha: the noise scale (>= 0; 0 adds nothing). The paper uses 5 to 15.
        length: "padded" or "tokens".
        embedding: dotted path of the input-embedding module; by default that of the first transformers model.
        start_epoch: first epoch (counted from 0) that is noised.
        start_step: first optimizer step (counted from 0, over the run) that is noised.
        seed: seed of the callback's own random generator, saved in checkpoints; None: from seed_everything.

    Example::

        >>> import torch, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import NEFTuneCallback
        >>> class Tokens(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(10, 32)
        ...     def training_step(self, batch, batch_idx):
        ...         ids = (batch.abs() * 10).long().clamp(max=9)[:, :4]
        ...         return self.layer(self.emb(ids).mean(1)).sum()
        >>> neftune = NEFTuneCallback(noise_alpha=5.0, embedding="emb")
        >>> trainer = L.Trainer(max_steps=2, callbacks=[neftune], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Tokens())
        >>> neftune.attacks
        2
    """

    supports_fsdp = True  # the noise lives in the activations: tests/test_neftune.py
    supports_fsdp_accumulation = True

    def __init__(
        self,
        noise_alpha: NonNegativeFloat = 5.0,
        length: Literal["padded", "tokens"] = "padded",
        embedding: Optional[str] = None,
        start_epoch: NonNegativeInt = 0,
        start_step: NonNegativeInt = 0,
        seed: Optional[NonNegativeInt] = None,
    ) -> None:
        owner = type(self).__name__
        check_non_negative(owner, noise_alpha=noise_alpha)
        check_choice(owner, "length", length, ("padded", "tokens"))
        check_module_path(owner, "embedding", embedding)
        super().__init__(start_epoch=start_epoch, start_step=start_step, seed=seed)
        self.noise_alpha, self.length, self.embedding = float(noise_alpha), length, embedding

    def target_key(self) -> Dict[str, Any]:
        return {"embedding": self.embedding}

    def build_method(self, pl_module: LightningModule) -> NEFTune:
        method = NEFTune(pl_module, noise_alpha=self.noise_alpha, length=self.length, embedding=self.embedding)
        module = method.target.module
        hooked = [h for h in module._forward_hooks.values() if "neftune" in getattr(h, "__name__", "").lower()]
        if hooked or getattr(module, "neftune_noise_alpha", None) is not None:
            raise ValueError(
                f"the embedding module {method.target.path!r} already carries transformers' NEFTune hook "
                "(neftune_noise_alpha / neftune_post_forward_hook, e.g. from a transformers or TRL Trainer): the noise "
                "would be added twice. Remove that hook (model.get_input_embeddings()._forward_hooks) or this callback."
            )
        return method


__all__ = ["NEFTuneCallback"]
