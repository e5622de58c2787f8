"""SAMCallback and MomentumSAMCallback: sharpness-aware minimisation for any LightningModule."""

from __future__ import annotations

from typing import Any, Dict

from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_adv.callbacks import compat
from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, PositiveInt, check_int, check_non_negative
from lightning_adv.core.momentum_sam import MomentumSAM
from lightning_adv.core.sam import SAM


class SAMCallback(AdversarialCallback):
    """SAM (ASAM with ``adaptive=True``): every trainable weight moves by ``rho * g / ||g||`` (ASAM:
    ``rho * w^2 * g / ||w * g||``), the norm over all parameters together; the micro-batch's gradient is REPLACED by
    the gradient at the perturbed weights, and the weights are restored exactly (:class:`~lightning_adv.core.SAM`,
    after davda54/sam). With gradient accumulation each micro-batch is perturbed from its own clean gradient; under
    DDP from the rank's local gradient (as the paper and Composer), with one all-reduce per optimizer step; under
    FSDP from the step's global gradient (FSDP has reduced it before the callback sees it: each process perturbs its
    shard, the norm summed over the shards; with several processes ``accumulate_grad_batches=1``); under
    16-mixed the direction comes from the unscaled gradient and an overflow skips the perturbation. Costs one pass
    every ``interval`` optimizer steps. Logs ``adv/sam_loss`` (the loss at the perturbed weights) and the counters.

    Args:
        rho: radius of the perturbation (>= 0; 0 disables it). ASAM uses larger values (2.0 in its README).
        adaptive: ASAM's scale-invariant perturbation.
        interval: the SAM step every ``interval`` optimizer steps, plain steps between (Composer's knob).
        start_epoch: first epoch (counted from 0) that is perturbed.
        start_step: first optimizer step (counted from 0, over the run) that is perturbed.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import SAMCallback
        >>> sam = SAMCallback(rho=0.05, interval=2)
        >>> trainer = L.Trainer(max_steps=4, callbacks=[sam], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> sam.attacks   # steps 0 and 2
        2
    """

    #: under FSDP the gradient is read on its shards (the norm all-reduced): after the backward each process holds its
    #: shard of the all-process mean, so the perturbation comes from the step's global gradient (not the rank's own)
    supports_fsdp = True

    def __init__(
        self,
        rho: NonNegativeFloat = 0.05,
        adaptive: bool = False,
        interval: PositiveInt = 1,
        start_epoch: NonNegativeInt = 0,
        start_step: NonNegativeInt = 0,
    ) -> None:
        owner = type(self).__name__
        check_non_negative(owner, rho=rho)
        check_int(owner, "interval", interval, 1, "a SAM step every `interval` optimizer steps")
        if not isinstance(adaptive, bool):
            raise ValueError(f"{owner}(adaptive={adaptive!r}): adaptive must be True or False.")
        super().__init__(start_epoch=start_epoch, start_step=start_step)
        self.rho, self.adaptive, self.interval = float(rho), adaptive, int(interval)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and compat.is_fsdp(trainer) and "HYBRID" in compat.fsdp_sharding(trainer):
            raise ValueError(
                f"{type(self).__name__} under FSDPStrategy(sharding_strategy={compat.fsdp_sharding(trainer)!r}) is not "
                "supported: the gradient norm would be summed over replicas as well as shards. Use 'FULL_SHARD', "
                "'SHARD_GRAD_OP' or 'NO_SHARD', or DDP ('ddp')."
            )
        super().setup(trainer, pl_module, stage)

    def build_method(self, pl_module: nn.Module) -> SAM:
        return SAM(pl_module, rho=self.rho, adaptive=self.adaptive)

    def wants_attack(self, trainer: Trainer) -> bool:
        return super().wants_attack(trainer) and (trainer.global_step - self.start_step) % self.interval == 0


class MomentumSAMCallback(AdversarialCallback):
    """Momentum-SAM: the clean forward and backward at ``w - rho * m / ||m||``, ``m`` the optimizer's own momentum
    (Adam/AdamW ``exp_avg``, SGD ``momentum_buffer``), the weights restored before ``optimizer.step``
    (:class:`~lightning_adv.core.MomentumSAM`, after MarlonBecker/MSAM): sharpness-aware at no extra pass. An optimizer
    without momentum is refused at the start of ``fit``. Composes with R3F, SMART and NEFTune; refused with the other
    methods (see the class). Counts attacks; logs no loss (there is no adversarial pass).

    Args:
        rho: radius of the perturbation (>= 0; 0 disables it).
        start_epoch: first epoch (counted from 0) that is perturbed.
        start_step: first optimizer step (counted from 0, over the run) that is perturbed.

    Example::

        >>> import lightning as L, torch
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_adv import MomentumSAMCallback
        >>> class Momentum(BoringModel):
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        >>> msam = MomentumSAMCallback(rho=0.3)
        >>> trainer = L.Trainer(max_steps=3, callbacks=[msam], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Momentum())
        >>> msam.attacks
        3
    """

    supports_fsdp = True  # the weights moved in place and restored from a copy there (tests/test_fsdp.py)
    supports_fsdp_accumulation = True  # reads no gradient: also with several processes

    def __init__(self, rho: NonNegativeFloat = 0.3, start_epoch: NonNegativeInt = 0, start_step: NonNegativeInt = 0) -> None:
        check_non_negative(type(self).__name__, rho=rho)
        super().__init__(start_epoch=start_epoch, start_step=start_step)
        self.rho = float(rho)

    def build_method(self, pl_module: LightningModule) -> MomentumSAM:
        optimizers = pl_module.trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"needs exactly one optimizer, got {len(optimizers)}.")
        return MomentumSAM(pl_module, optimizers[0], rho=self.rho)

    def target_key(self) -> Dict[str, Any]:
        return {}


__all__ = ["MomentumSAMCallback", "SAMCallback"]
