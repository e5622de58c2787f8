"""Shared test fixtures: tiny models, data, and a plain-PyTorch loop running the reference algorithms."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Mapping, Optional

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adv import AdversarialMixin, in_adversarial_pass
from reference_snippets import RefAWP, RefFGM

VOCAB, DIM, SEQ, CLASSES = 40, 8, 5, 3


class TinyText(nn.Module):
    """Embedding + mean pooling + MLP: names like a transformer's ('embeddings.word_embeddings.weight')."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings.word_embeddings(ids).mean(dim=1)
        return self.head(torch.tanh(self.hidden(h)))


def make_data(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def loader(ds: TensorDataset, batch_size: int = 4) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class TextModule(L.LightningModule):
    """Logs its loss and a torchmetrics accuracy; records the clean values to check isolation."""

    def __init__(self, seed: int = 0, lr: float = 0.05, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = TinyText().to(dtype)
        self.lr = lr
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES, average="micro")
        self.clean_losses: List[float] = []
        self.update_counts: List[int] = []
        self.steps_run = 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_counts.append(int(self.acc._update_count))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        logits = self.model(ids)
        loss = nn.functional.cross_entropy(logits, y)
        self.steps_run += 1
        if not in_adversarial_pass(self):
            self.clean_losses.append(float(loss.detach()))
        self.acc(logits.argmax(-1), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.acc, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ManualText(AdversarialMixin, TextModule):
    """Steps every ``accumulate`` batches, accumulating by hand (the loss is divided by ``accumulate``)."""

    def __init__(self, accumulate: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.k = accumulate
        self.loss_fn_calls = 0

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        ids, y = batch

        def loss_fn():
            self.loss_fn_calls += 1
            logits = self.model(ids)
            loss = nn.functional.cross_entropy(logits, y)
            self.acc(logits.argmax(-1), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            self.log("train_acc", self.acc, on_step=True, on_epoch=True)
            return loss / self.k

        loss = self.adversarial_backward(loss_fn)
        if not in_adversarial_pass(self):
            self.clean_losses.append(float(loss.detach()) * self.k)
        if (batch_idx + 1) % self.k == 0:
            opt.step()
            opt.zero_grad()


def trainer(**kwargs: Any) -> L.Trainer:
    defaults: Dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def cpu_fsdp_strategy(**kwargs: Any) -> Any:
    """Lightning's own ``FSDPStrategy`` on CPU processes (gloo), for tests: the same FSDP wrapper, flat parameters,
    hooks and reduce-scatter as on a GPU. Lightning refuses the ``"fsdp"`` flag without a GPU and passes
    ``device_id=None`` there, which torch's FSDP refuses on a machine without an accelerator; this subclass wraps
    the module itself with ``device_id=cpu`` and the precision plugin's mixed-precision configuration, as Lightning
    does (Lightning keeps a module that is already wrapped)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), sharding_strategy=self.sharding_strategy,
                                                 mixed_precision=self.mixed_precision_config, **self.kwargs)
            return super()._setup_model(model)

    return CPUFSDPStrategy(**kwargs)


def end_distributed() -> None:
    """Close the process group before the interpreter exits, in the multi-process test scripts.

    Left open, gloo's worker threads can still be running while Python tears down, and the process then aborts
    ("terminate called without an active exception", exit code -6) after its results were saved: seen about once in
    ten runs on a 2-core machine.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# The reference algorithms, as the article writes them (per-parameter loops, host-side checks, three saved
# copies for AWP), in a plain loop with the micro-batch fix: every micro-batch is attacked with its own clean
# gradient and earlier micro-batches' gradients are kept.
# ---------------------------------------------------------------------------------------------------------------


def reference_fit(
    module: TextModule,
    batches: List[Any],
    *,
    epochs: int,
    method: Optional[str],
    kwargs: Dict[str, Any],
    accumulate: int = 1,
    clip: Optional[float] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    start_epoch: int = 0,
) -> None:
    """Train ``module.model`` with the reference algorithm and the optimizer of ``module``."""
    model = module.model
    opt = module.configure_optimizers()
    params = list(model.parameters())

    def loss_fn(ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device.type
        ctx = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            return nn.functional.cross_entropy(model(ids), y)

    def backward(loss: torch.Tensor) -> None:
        loss = loss / accumulate
        (scaler.scale(loss) if scaler else loss).backward()

    for epoch in range(epochs):
        for i, (ids, y) in enumerate(batches):
            earlier = [p.grad for p in params]
            for p in params:
                p.grad = None
            backward(loss_fn(ids, y))
            if method is not None and epoch >= start_epoch:
                if method == "fgm":
                    fgm = RefFGM(model, **kwargs)
                    fgm.attack()
                    backward(loss_fn(ids, y))
                    fgm.restore()
                else:
                    RefAWP(model, **kwargs).attack_backward(lambda: loss_fn(ids, y), backward)
            for p, old in zip(params, earlier):
                if old is not None:
                    p.grad = old if p.grad is None else p.grad + old
            if (i + 1) % accumulate == 0:
                if scaler is not None:
                    scaler.unscale_(opt)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference of the parameters (on the CPU: Lightning moves a module back there after fit)."""
    return max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


class LogitsText(TextModule):
    """Returns ``{"loss", "logits"}``, as SMART and R3F need."""

    def training_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        ids, y = batch
        logits = self.model(ids)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return {"loss": loss, "logits": logits}


class SGDLogits(LogitsText):
    """LogitsText with plain SGD: float rounding differences are not amplified by Adam's first steps (which turn a
    gradient's sign into a full learning-rate step)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BatchSeeded(L.Callback):
    """Seeds the noise of every method from the batch's content: the same noise for a micro-batch whichever
    process or position runs it (DDP against single-process accumulation). ``(ids, labels)`` batches, or dict
    (``BatchEncoding``) batches seeded by their ``input_ids``."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, Mapping):
            seed = int(batch["input_ids"].sum())
        else:
            seed = int(batch[0].sum()) * 1000 + int(batch[1].sum())
        for cb in trainer.callbacks:
            method = getattr(cb, "method", None)
            if method is not None and hasattr(method, "generator"):
                method.generator = torch.Generator(pl_module.device).manual_seed(seed)
