"""AdversarialMixin: the attacks of the Trainer's adversarial callbacks for manual-optimization modules."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch

from lightning_adv.callbacks.coordinator import manual_backward

LossOutput = Union[torch.Tensor, Mapping[str, Any]]


class AdversarialMixin:
    """Gives a manual-optimization LightningModule the attacks of the adversarial callbacks on its Trainer.

    Mix it into a ``LightningModule`` (from ``lightning.pytorch`` or ``pytorch_lightning``) and replace
    ``self.manual_backward(loss)`` by ``self.adversarial_backward(lambda: <compute the loss>)``. The attacks
    stay configured on the Trainer (``FGMCallback``, ``AWPCallback``, ...; so CLI flags work) and run as in
    automatic optimization: in their order, each from this call's own clean gradient. Gradients already in
    ``.grad`` before the call are kept (accumulating by hand loses nothing). Precision (GradScaler) and DDP come
    through ``manual_backward``; under DDP the gradients are all-reduced once, at the last backward of the call.
    With no adversarial callback attached (or before ``start_epoch``) it is exactly
    ``self.manual_backward(loss_fn())``.

    Example::

        >>> import lightning as L, torch
        >>> from lightning_adv import AdversarialMixin, FGMCallback
        >>> class Model(AdversarialMixin, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.automatic_optimization = False
        ...         self.emb = torch.nn.Embedding(10, 4)
        ...         self.head = torch.nn.Linear(4, 2)
        ...     def training_step(self, batch, batch_idx):
        ...         opt = self.optimizers()
        ...         opt.zero_grad()
        ...         ids, y = batch
        ...         loss_fn = lambda: torch.nn.functional.cross_entropy(self.head(self.emb(ids).mean(1)), y)
        ...         loss = self.adversarial_backward(loss_fn)
        ...         opt.step()
        ...         self.log("loss", loss)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,)))
        >>> fgm = FGMCallback(epsilon=0.5, emb_name="emb")
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[fgm], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=4))
        >>> fgm.attacks
        2
    """

    def adversarial_backward(self, loss_fn: Callable[[], LossOutput]) -> torch.Tensor:
        """Backpropagate ``loss_fn()`` and the adversarial passes of every attached attack; return the clean loss.

        Args:
            loss_fn: computes the loss of the current batch from the module's current parameters (a tensor, or a
                mapping with a ``"loss"`` key, and ``"logits"`` for SMART/R3F). It is called once for the clean loss
                and once per adversarial pass; ``self.log`` calls and torchmetrics updates inside it count only once.
        """
        module: Any = self
        return manual_backward(module, loss_fn)
