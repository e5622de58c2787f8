"""Every access to Lightning internals lives here, each covered by a test, since private names move."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from lightning_adv import strategies


def step_args(pl_module: Any, batch: Any, batch_idx: int) -> tuple:
    """The positional arguments Lightning passes to ``training_step`` (``batch_idx`` is optional)."""
    if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
        return (batch, batch_idx)
    return (batch,)


def run_step(trainer: Any, method: str, args: Sequence[Any]) -> Any:
    """Call ``method`` of the LightningModule the way Lightning calls ``training_step``.

    Under the precision plugin's autocast and, with DDP, through the ``DistributedDataParallel`` forward,
    so that the reducer is prepared for the backward that follows.
    """
    strategy = trainer.strategy
    if method == "training_step":
        return strategy.training_step(*args)
    module = strategy.lightning_module
    with strategy.precision_plugin.train_step_context():
        if strategy.model is not None and strategy.model is not module:
            return strategy._forward_redirection(strategy.model, module, method, *args)
        return getattr(module, method)(*args)


def will_step_optimizer(trainer: Any) -> bool:
    """Whether the current micro-batch is the last of its accumulation window (Lightning syncs DDP on it)."""
    try:
        return not trainer.fit_loop._should_accumulate()
    except AttributeError as err:  # pragma: no cover - only on an unsupported Lightning release
        raise RuntimeError(
            "lightning_adv could not ask Lightning whether this micro-batch steps the optimizer "
            "(`trainer.fit_loop._should_accumulate`); this Lightning release is not supported."
        ) from err


def scaler_of(trainer: Any) -> Optional[torch.amp.GradScaler]:
    """The precision plugin's GradScaler (16-mixed), or None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def scale_of(trainer: Any) -> Optional[torch.Tensor]:
    """The GradScaler's current scale as a tensor on the device (no host synchronisation, unlike
    ``GradScaler.get_scale()``), or None without an enabled scaler."""
    scaler = scaler_of(trainer)
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)


def ddp_module(trainer: Any) -> Optional[DistributedDataParallel]:
    """The ``DistributedDataParallel`` wrapper of the model during fit, or None."""
    model = getattr(trainer.strategy, "model", None)
    return model if isinstance(model, DistributedDataParallel) else None


def is_fsdp(trainer: Any) -> bool:
    """Whether the trainer runs Lightning's ``FSDPStrategy`` (by name: also ``pytorch_lightning``'s)."""
    return strategies.is_fsdp(trainer.strategy)


def shard_sum(trainer: Any) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Under FSDP sharding over several processes, the sum of a tensor over them (the strategy's all-reduce): each holds
    a shard of the gradients; ``None`` otherwise (one process, or ``NO_SHARD``: every process holds whole gradients).
    Hybrid sharding (shards within a node, replicas across nodes) is refused at setup by the callbacks that read it."""
    if not is_fsdp(trainer) or trainer.world_size <= 1 or fsdp_sharding(trainer) == "NO_SHARD":
        return None
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def fsdp_sharding(trainer: Any) -> str:
    """The name of the FSDP strategy's sharding strategy (``"FULL_SHARD"``, ``"NO_SHARD"``, ``"HYBRID_SHARD"``...)."""
    sharding = getattr(trainer.strategy, "sharding_strategy", None)
    return str(getattr(sharding, "name", sharding))


def ddp_kwargs(strategy: Any) -> dict:
    """The keyword arguments the DDP strategy passes to ``DistributedDataParallel``."""
    return dict(getattr(strategy, "_ddp_kwargs", {}) or {})
