"""The Lightning layer: one base callback that runs the core attacks inside a Lightning training step."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
from torch import nn

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from lightning_adv.callbacks import compat
from lightning_adv.callbacks.isolation import StateGuard, silenced_logging
from lightning_adv.core.attack import ParameterAttack
from lightning_adv.core.grads import GradientStash

_SHARDING = ("DeepSpeed", "FSDP", "XLA", "ModelParallel")  # DeepSpeedStrategy subclasses DDPStrategy
SUPPORTED_STRATEGIES = "single device ('auto' on one device), 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook'"


def loss_of(output: Any) -> Optional[torch.Tensor]:
    """The loss in what ``training_step`` returned: a tensor, a mapping with ``"loss"``, or None."""
    if output is None or isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise TypeError(
        "lightning_adv: the adversarial pass needs the loss; return a tensor or a dict with a 'loss' key "
        f"from training_step (or define adversarial_loss), got {type(output).__name__}."
    )


def adversarial_callbacks(trainer: Any) -> List["AdversarialCallback"]:
    """The adversarial callbacks attached to ``trainer``, in their order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, AdversarialCallback)]


class _BackwardSync:
    """Controls when DDP all-reduces: never for the clean and inner adversarial backward passes, only for the
    last backward of the optimizer step. A no-op without DDP."""

    def __init__(self, ddp: Optional[nn.Module]) -> None:
        self.ddp = ddp
        self._original: Optional[bool] = None

    def hold(self) -> None:
        if self.ddp is not None and self._original is None:
            self._original = self.ddp.require_backward_grad_sync
            self.ddp.require_backward_grad_sync = False

    def arm(self, sync: bool) -> None:
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = sync

    def release(self) -> None:
        if self.ddp is not None and self._original is not None:
            self.ddp.require_backward_grad_sync = self._original
        self._original = None


class AttackRound:
    """One micro-batch's attacks: stash earlier gradients, attack with each callback in turn, merge back.

    The clean backward must run between :meth:`begin` and :meth:`run`. Shared by the automatic hooks of
    :class:`AdversarialCallback` and by :class:`~lightning_adv.AdversarialMixin`.
    """

    def __init__(self, attackers: List["AdversarialCallback"], pl_module: nn.Module, sync: _BackwardSync, will_sync: bool) -> None:
        self.attackers = attackers
        self.pl_module = pl_module
        self.sync = sync
        self.will_sync = will_sync
        self.stash = GradientStash(p for p in pl_module.parameters() if p.requires_grad)
        self.done = False

    def begin(self) -> None:
        """Before the clean backward: no DDP all-reduce for it, and earlier gradients moved aside."""
        self.sync.hold()
        self.stash.stash()

    def run(self, closure: Callable[[], Optional[torch.Tensor]], backward: Callable[[torch.Tensor], None]) -> None:
        """After the clean backward: every attack, then the gradients merged and all-reduced once."""

        self.done = True

        def finish() -> None:
            self.stash.merge()
            self.sync.arm(self.will_sync)

        world = self.sync.ddp.process_group.size() if self.sync.ddp is not None and self.sync.ddp.process_group is not None else 1
        try:
            for j, cb in enumerate(self.attackers):
                last = j == len(self.attackers) - 1
                cb._attack.grad_scale = 1.0 / world
                cb._attack.attack_backward(closure, backward, finish if last else None)
                cb._record(self.pl_module)
        finally:
            self.stash.merge()


class AdversarialCallback(Callback):
    """Base class of the adversarial-training callbacks.

    Logs ``adv/<log_name>_loss`` every step (and its epoch mean), and the cumulative counters
    ``adv/<log_name>_attacks`` and ``adv/<log_name>_skipped`` at the end of every training epoch.

    A subclass builds its core attack in :meth:`build_attack` and names itself in :attr:`log_name`; the
    base runs it in ``on_after_backward`` of every training micro-batch. The first adversarial callback
    on the Trainer drives all of them, in their order, so that the gradient of earlier micro-batches is
    moved aside once and the DDP all-reduce happens once, at the last backward of the step.

    The adversarial pass re-runs ``training_step`` through the strategy (autocast, DDP wrapper), with
    ``self.log``/``log_dict`` silenced and torchmetrics states and module buffers restored afterwards, or
    calls the module's ``adversarial_loss(batch, batch_idx)`` if it defines one. Its loss is divided by
    ``accumulate_grad_batches`` and goes through the GradScaler, like the clean one.
    """

    log_name: str = "adv"

    def __init__(self, start_epoch: int = 0) -> None:
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(
                f"{type(self).__name__}(start_epoch={start_epoch!r}): start_epoch must be an integer >= 0 "
                "(the first epoch, counted from 0, that is attacked)."
            )
        self.start_epoch = start_epoch
        self._attack: Any = None
        self._group: Optional[List[AdversarialCallback]] = None  # set on the first callback only
        self._round: Optional[AttackRound] = None
        self._guard: Optional[StateGuard] = None
        self._step: Optional[tuple] = None
        self._counts: Optional[torch.Tensor] = None  # [attacks, skipped] of this run, on the device
        self._restored_counts = [0, 0]
        self._last_loss: Optional[torch.Tensor] = None
        self._manual_calls = 0
        self._warned_manual = False

    # -- what a subclass provides -------------------------------------------------------------------------
    def build_attack(self, pl_module: nn.Module) -> ParameterAttack:
        """Return the core attack for ``pl_module``; raise ``ValueError`` if it cannot be attacked."""
        raise NotImplementedError

    def enabled(self) -> bool:
        """Whether the hyperparameters ask for any attack at all."""
        return True

    # -- counters -------------------------------------------------------------------------------------------
    @property
    def attacks(self) -> int:
        """Micro-batches attacked so far, over resumed runs."""
        return self._restored_counts[0] + (int(self._counts[0]) if self._counts is not None else 0)

    @property
    def skipped(self) -> int:
        """Attacks skipped because a gradient norm was not finite (fp16 overflow)."""
        return self._restored_counts[1] + (int(self._counts[1]) if self._counts is not None else 0)

    def state_dict(self) -> Dict[str, Any]:
        return {"attacks": self.attacks, "skipped": self.skipped}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._restored_counts = [int(state_dict.get("attacks", 0)), int(state_dict.get("skipped", 0))]
        self._counts = None

    def _record(self, pl_module: nn.Module) -> None:
        attack = self._attack
        loss = attack.last_loss
        assert loss is not None and attack.last_skipped is not None
        if self._counts is None:
            self._counts = torch.zeros(2, dtype=torch.long, device=loss.device)
        self._counts[0] += 1
        self._counts[1] += attack.last_skipped.to(self._counts.device)
        # one self.log per step (each costs about 1 ms in Lightning); the counters are logged once per epoch
        pl_module.log(f"adv/{self.log_name}_loss", loss.float(), on_step=True, on_epoch=True, batch_size=1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counts is None:
            return
        totals = self._counts.float() + torch.tensor(self._restored_counts, dtype=torch.float32, device=self._counts.device)
        pl_module.log_dict({f"adv/{self.log_name}_attacks": totals[0], f"adv/{self.log_name}_skipped": totals[1]},
                           on_step=False, on_epoch=True, batch_size=1)

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        # by class name: the same check holds for `lightning.pytorch` and `pytorch_lightning` strategies
        names = [c.__name__ for c in type(strategy).__mro__]
        sharded = any(word in name for name in names for word in _SHARDING)
        if sharded or not {"SingleDeviceStrategy", "DDPStrategy"} & set(names):
            raise ValueError(
                f"{type(self).__name__} does not support the strategy {type(strategy).__name__}: strategies that "
                f"shard parameters or gradients (FSDP, DeepSpeed, model parallel) are refused. Supported: {SUPPORTED_STRATEGIES}."
            )
        if "DDPStrategy" in names and compat.ddp_kwargs(strategy).get("gradient_as_bucket_view"):
            raise ValueError(
                f"{type(self).__name__} needs DDPStrategy(gradient_as_bucket_view=False) (the default): it moves "
                "gradients aside between backward passes, which bucket views do not allow."
            )
        self._attack = self.build_attack(pl_module)
        group = adversarial_callbacks(trainer)
        self._group = group if group and group[0] is self else None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._warned_manual = False
        self._manual_calls = 0
        if self._group is not None:
            self._guard = StateGuard(pl_module)

    def _wants_attack(self, trainer: Trainer) -> bool:
        return self.enabled() and trainer.current_epoch >= self.start_epoch and any(p.requires_grad for p in self._attack.parameters)

    def _plan(self, trainer: Trainer) -> List["AdversarialCallback"]:
        return [cb for cb in self._group or [] if cb._wants_attack(trainer)]

    # -- the automatic-optimization step ---------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._manual_calls = 0
        if self._group is None or not pl_module.automatic_optimization:
            return
        plan = self._plan(trainer)
        if not plan:
            self._round = None
            return
        self._step = (batch, batch_idx)
        self._round = AttackRound(plan, pl_module, _BackwardSync(compat.ddp_module(trainer)), compat.will_step_optimizer(trainer))
        self._round.sync.hold()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._round is not None and pl_module.automatic_optimization and not self._round.stash.active:
            self._round.begin()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        round_ = self._round
        if round_ is None or round_.done or not pl_module.automatic_optimization:
            return  # one attack per micro-batch: backward hooks that fire again inside it do nothing
        batch, batch_idx = self._step
        if callable(getattr(pl_module, "adversarial_loss", None)):
            method, args = "adversarial_loss", (batch, batch_idx)
        else:
            method, args = "training_step", compat.step_args(pl_module, batch, batch_idx)
        guard = self._guard
        scaler = compat.scaler_of(trainer)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        k = trainer.accumulate_grad_batches

        def closure() -> Optional[torch.Tensor]:
            with silenced_logging(pl_module):
                return loss_of(compat.run_step(trainer, method, args))

        def backward(loss: torch.Tensor) -> None:
            if k != 1:
                loss = loss / k
            if scaler is not None:
                loss = scaler.scale(loss)
            trainer.precision_plugin.backward(loss, pl_module, optimizer)

        # buffers are restored after the backward passes: autograd may have saved them (BatchNorm, BERT ids)
        with adversarial_pass(pl_module), guard.preserved():
            round_.run(closure, backward)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._release(trainer)
        if (
            self._group is not None
            and not pl_module.automatic_optimization
            and self._manual_calls == 0
            and not self._warned_manual
            and self._plan(trainer)
        ):
            self._warned_manual = True
            names = ", ".join(type(cb).__name__ for cb in self._group)
            warnings.warn(
                f"{names} attached, but {type(pl_module).__name__} uses manual optimization and its training_step "
                "did not call self.adversarial_backward(loss_fn): no attack ran. Mix lightning_adv.AdversarialMixin "
                "into the module and replace self.manual_backward(loss) by self.adversarial_backward(lambda: loss_fn(batch)).",
                UserWarning,
                stacklevel=2,
            )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release(trainer)

    def _release(self, trainer: Trainer) -> None:
        round_, self._round, self._step = self._round, None, None
        if round_ is not None:
            round_.sync.release()
            round_.stash.merge()


@contextmanager
def adversarial_pass(pl_module: nn.Module) -> Iterator[None]:
    """Marks the module while an adversarial pass runs: ``pl_module._adv_active`` is True, so that other
    callbacks whose backward hooks fire again can tell."""
    object.__setattr__(pl_module, "_adv_active", True)
    try:
        yield
    finally:
        object.__setattr__(pl_module, "_adv_active", False)
