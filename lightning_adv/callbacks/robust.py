"""RobustAccuracy: accuracy under an FGM attack on the embeddings, measured at validation and test time."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_adv.core.checks import check_non_negative
from lightning_adv.core.fgm import FGM

PROTOCOL = "robust_forward"

_STAGES = {"validate": "val", "test": "test"}


def _check_positive_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be an integer >= {minimum}.")


class RobustAccuracy(Callback):
    """Accuracy of the model on adversarially perturbed word embeddings, at validation and test time.

    For every validation/test batch, the callback computes the gradient of the cross-entropy loss with
    respect to the embedding weights only (``torch.autograd.grad``: the ``.grad`` of the parameters, which
    training uses, is left as it was), perturbs those weights with the core :class:`~lightning_adv.FGM`
    (``epsilon * g / ||g||``, the same perturbation ``FGMCallback`` trains with), evaluates the logits at
    the perturbed weights, restores the weights exactly, and updates a torchmetrics ``MulticlassAccuracy``.
    It logs ``val_robust_acc`` and ``test_robust_acc`` at epoch level (``{prefix}_robust_acc``).

    The perturbation is computed per batch: ``epsilon`` is the L2 norm of the change of the whole embedding
    matrix, shared by the sentences of the batch, so compare robust accuracies at the same ``epsilon`` and
    the same evaluation batch size. The model is evaluated in eval mode (no dropout), as Lightning sets it.

    **Protocol.** The LightningModule must define ``robust_forward(batch) -> (logits, labels)``: the logits
    (``[batch, num_classes]``) of a batch as the evaluation dataloader yields it, and the integer labels.
    The loss that is attacked is ``cross_entropy(logits, labels)``.

    Lightning runs validation and test under ``torch.inference_mode()``; the callback leaves it for its own
    computation (``torch.inference_mode(False)``, ``torch.enable_grad()``, and a clone of the batch's
    tensors), so it works with the default ``Trainer(inference_mode=True)``. It runs inside the precision
    plugin's forward context (autocast for mixed precision). A batch whose gradient norm is not finite is
    evaluated unperturbed and counted in :attr:`skipped`. Nothing runs during the sanity check.

    Args:
        epsilon: L2 norm of the perturbation of each matched embedding matrix (>= 0); 0 gives the clean accuracy.
        emb_name: substring of the names of the embedding parameters to perturb
            (``"word_embeddings"`` for BERT-family models from ``transformers``).
        num_classes: number of classes of the logits (>= 2).
        validate: measure during validation (``val_robust_acc``), including the validation of ``fit``.
        test: measure during test (``test_robust_acc``).
        prog_bar: show the robust accuracy in the progress bar.

    Example::

        >>> import torch, lightning as L
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Tiny(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.word_embeddings = torch.nn.Embedding(10, 4)
        ...         self.head = torch.nn.Linear(4, 2)
        ...     def robust_forward(self, batch):
        ...         ids, labels = batch
        ...         return self.head(self.word_embeddings(ids).mean(1)), labels
        ...     def test_step(self, batch, batch_idx):
        ...         pass
        >>> data = DataLoader(TensorDataset(torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,))), batch_size=4)
        >>> robust = RobustAccuracy(epsilon=0.5)
        >>> trainer = L.Trainer(callbacks=[robust], logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> metrics = trainer.test(Tiny(), data, verbose=False)[0]
        >>> sorted(metrics), robust.batches
        (['test_robust_acc'], 2)
    """

    def __init__(
        self,
        epsilon: float = 1.0,
        emb_name: str = "word_embeddings",
        num_classes: int = 2,
        validate: bool = True,
        test: bool = True,
        prog_bar: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_non_negative(owner, epsilon=epsilon)
        _check_positive_int(owner, "num_classes", num_classes, 2)
        if not isinstance(emb_name, str) or not emb_name:
            raise ValueError(f"{owner}(emb_name={emb_name!r}): emb_name must be a non-empty string.")
        self.epsilon = float(epsilon)
        self.emb_name = emb_name
        self.num_classes = num_classes
        self.stages = [stage for stage, on in (("validate", validate), ("test", test)) if on]
        self.prog_bar = prog_bar
        self._fgm: Optional[FGM] = None
        self._metrics: Dict[str, nn.Module] = {}
        self.batches = 0
        """Batches evaluated under attack so far (all stages)."""
        self.skipped = 0
        """Batches evaluated unperturbed because the gradient norm was not finite."""

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        owner = type(self).__name__
        if not callable(getattr(pl_module, PROTOCOL, None)):
            raise TypeError(
                f"{owner} needs {type(pl_module).__name__}.{PROTOCOL}(batch) -> (logits, labels): define it in the "
                "LightningModule (the logits of an evaluation batch and its integer labels), e.g. "
                "`def robust_forward(self, batch): return self(batch), batch['labels']`."
            )
        try:
            self._fgm = FGM(pl_module, epsilon=self.epsilon, emb_name=self.emb_name)
        except ValueError as err:
            raise ValueError(str(err).replace("FGM(", f"{owner}(", 1)) from None
        from torchmetrics.classification import MulticlassAccuracy

        device = trainer.strategy.root_device
        for name in self.stages:
            if name not in self._metrics:
                self._metrics[name] = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
            self._metrics[name] = self._metrics[name].to(device)

    # -- the measurement ------------------------------------------------------------------------------------
    @contextmanager
    def _grads_set(self, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> Iterator[None]:
        """Put ``grads`` in ``.grad`` for the perturbation, then put back the ``.grad`` objects training holds."""
        saved = [p.grad for p in params]
        try:
            for p, g in zip(params, grads):
                p.grad = g
            yield
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    def robust_logits(self, trainer: Optional[Trainer], pl_module: LightningModule, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """The logits of ``batch`` at the FGM-perturbed embeddings, and its labels; the weights are restored."""
        fgm = self._fgm
        if fgm is None:
            raise RuntimeError(f"{type(self).__name__}: setup has not run (attach the callback to a Trainer).")
        forward_context = trainer.precision_plugin.forward_context if trainer is not None else _null
        params = [p for p in fgm.parameters if p.requires_grad]
        with torch.inference_mode(False), torch.enable_grad():
            batch = apply_to_collection(batch, torch.Tensor, lambda t: t.clone())  # inference tensors cannot enter autograd
            with forward_context():
                logits, labels = self._forward(pl_module, batch)
            loss = F.cross_entropy(logits.float(), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad(), self._grads_set(params, grads), fgm.perturbed() as finite:
                with forward_context():
                    adv_logits, _ = self._forward(pl_module, batch)
        self.batches += 1
        self.skipped += int(not bool(finite))
        return adv_logits.detach(), labels.detach()

    def _forward(self, pl_module: LightningModule, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        out = getattr(pl_module, PROTOCOL)(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                f"{type(pl_module).__name__}.{PROTOCOL}(batch) must return (logits, labels), got {type(out).__name__}."
            )
        return out[0], out[1]

    def _on_batch(self, stage: str, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        if stage not in self._metrics or trainer.sanity_checking:
            return
        logits, labels = self.robust_logits(trainer, pl_module, batch)
        metric = self._metrics[stage]
        if metric.device != logits.device:
            self._metrics[stage] = metric = metric.to(logits.device)
        metric.update(logits.argmax(dim=-1), labels)

    def _on_epoch_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        metric = self._metrics.get(stage)
        if metric is None:
            return
        if trainer.sanity_checking or not metric.update_called:
            metric.reset()
            return
        value = metric.compute()  # torchmetrics syncs the states across processes
        metric.reset()
        pl_module.log(f"{_STAGES[stage]}_robust_acc", value, on_step=False, on_epoch=True, prog_bar=self.prog_bar)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._on_batch("validate", trainer, pl_module, batch)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._on_batch("test", trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on_epoch_end("validate", trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on_epoch_end("test", trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "validate" in self._metrics:
            self._metrics["validate"].reset()

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self._metrics:
            self._metrics["test"].reset()


@contextmanager
def _null() -> Iterator[None]:
    yield


__all__: List[str] = ["RobustAccuracy"]
