"""Which distributed strategies the attacks support, and why the others are refused: one module for the Trainer's
callbacks and for Fabric. Strategies are recognised by the class names along their MRO, so ``lightning`` and
``pytorch_lightning`` strategies (and Fabric's) alike, without importing them.

>>> from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
>>> check_strategy(DDPStrategy(), "FGMCallback")
>>> check_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy), "FGMCallback")
Traceback (most recent call last):
...
ValueError: FGMCallback does not support the strategy DeepSpeedStrategy: strategies that shard parameters or gradients (DeepSpeed, FSDP, XLA, model parallel) are refused. Supported: single device ('auto' on one device), 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook'.
"""

from __future__ import annotations

from typing import Any, List

SHARDING = ("DeepSpeed", "FSDP", "XLA", "ModelParallel")  # DeepSpeedStrategy subclasses DDPStrategy
SUPPORTED = "single device ('auto' on one device), 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook'"
BUCKET_VIEWS = (
    "needs DDPStrategy(gradient_as_bucket_view=False) (the default): it moves gradients aside between backward passes, "
    "which bucket views do not allow."
)


def strategy_names(strategy: Any) -> List[str]:
    """The class names along the strategy's MRO."""
    return [c.__name__ for c in type(strategy).__mro__]


def is_fsdp(strategy: Any) -> bool:
    """Whether ``strategy`` is (a subclass of) an ``FSDPStrategy``."""
    return "FSDPStrategy" in strategy_names(strategy)


def check_strategy(strategy: Any, owner: str, fsdp_note: str = "") -> None:
    """Raise ``ValueError`` naming the strategy and the supported ones unless it is a single device or DDP.

    ``fsdp_note``: what the caller supports under FSDP, added to the message (the callbacks check FSDP themselves
    before calling this; Fabric refuses it).
    """
    names = strategy_names(strategy)
    if any(w in n for n in names for w in SHARDING) or not {"SingleDeviceStrategy", "DDPStrategy"} & set(names):
        raise ValueError(
            f"{owner} does not support the strategy {type(strategy).__name__}: strategies that shard parameters or "
            f"gradients (DeepSpeed, {'' if fsdp_note else 'FSDP, '}XLA, model parallel) are refused. Supported: "
            f"{SUPPORTED}{fsdp_note}."
        )


def check_bucket_views(uses_bucket_views: bool, owner: str) -> None:
    """Raise ``ValueError`` when DDP hands out gradients as views into its buckets."""
    if uses_bucket_views:
        raise ValueError(f"{owner} {BUCKET_VIEWS}")


__all__ = ["SHARDING", "SUPPORTED", "check_bucket_views", "check_strategy", "is_fsdp", "strategy_names"]
