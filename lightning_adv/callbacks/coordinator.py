"""The Lightning driver of the engine: one per Trainer, registered by the adversarial callbacks at ``setup``."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterator, List, Optional

import torch

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_adv.callbacks import compat
from lightning_adv.callbacks.modes import warn_eval_mode
from lightning_adv.callbacks.isolation import (
    SideEffects, StateGuard, adversarial_pass, copy_containers, silenced_logging,
)
from lightning_adv.core.passes import required_loss
from lightning_adv.core.step import AttackStep, BackwardSync, Outcome, check_composition, join_clean_loss, run_micro_batch


class Coordinator(Callback):
    """Runs the attacks of a Trainer's adversarial callbacks, in their order, once per training micro-batch.

    The one owner of the micro-batch: the adversarial callbacks are configuration and counters; each registers
    itself at ``setup`` (:meth:`register`), which appends the Trainer's one coordinator to ``trainer.callbacks``
    (after the callbacks, so that its ``on_fit_start`` sees their methods built); it removes itself at
    ``teardown``. Automatic optimization: the step is built at ``on_train_batch_start`` (the batch's containers
    copied before ``training_step`` can mutate them), earlier gradients move aside at ``on_before_backward``, the
    methods run at ``on_after_backward`` and the step is closed at ``on_train_batch_end``, or at the first hook
    that follows any other end of the micro-batch: an exception, a module's ``on_train_batch_start`` returning -1
    (``on_train_epoch_end``), the end of training. Manual optimization: the mixin calls :meth:`manual_backward`.
    """

    def __init__(self) -> None:
        self.callbacks: List[Any] = []
        self.step: Optional[AttackStep] = None
        self.plan: List[Any] = []
        self.guard: Optional[StateGuard] = None
        self.manual_calls = 0
        self._batch: Any = None
        self._phase = ""
        self._captured: Any = None
        self._watch: Optional[SideEffects] = None  # the module's public state after the clean pass
        self._capturing: Any = None  # the module whose training_step output is captured
        self._scaled: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss  # a loss as the clean one is scaled
        self._warned: set = set()

    # -- registration ---------------------------------------------------------------------------------------------
    @staticmethod
    def of(trainer: Any) -> Optional["Coordinator"]:
        """The coordinator registered on ``trainer``, or None."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, Coordinator)), None)

    @classmethod
    def register(cls, trainer: Any, callback: Any) -> "Coordinator":
        """Add ``callback`` to the attacks of ``trainer``'s coordinator (created and appended on first use)."""
        coordinator = cls.of(trainer)
        if coordinator is None:
            coordinator = cls()
            trainer.callbacks.append(coordinator)
        if callback not in coordinator.callbacks:
            coordinator.callbacks.append(callback)
        return coordinator

    # -- hooks ------------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """After the callbacks built their methods: refuse a composition that is not defined, name the log keys."""
        methods = [cb.method for cb in self.callbacks if cb.method is not None]
        try:
            check_composition(methods)
        except ValueError as err:
            names = ", ".join(type(cb).__name__ for cb in self.callbacks)
            raise ValueError(f"{names}: {err}") from None
        by_name: dict = {}
        for cb in self.callbacks:
            by_name.setdefault(cb.method.name if cb.method is not None else "adv", []).append(cb)
        for name, group in by_name.items():  # two callbacks of one method log under keys suffixed by their target
            labels = [cb.target_label() for cb in group]
            for i, cb in enumerate(group):
                label = labels[i] if labels.count(labels[i]) == 1 else f"{labels[i]}_{i}"
                cb.log_name = name if len(group) == 1 else f"{name}_{label}"
        self.guard = StateGuard(pl_module)
        self._warned = set()
        self.manual_calls = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # after the LightningModule's own on_fit_start (where a model may be put in train mode)
        warn_eval_mode(pl_module, self.callbacks)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.before_backward(pl_module, loss)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.after_backward(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.close()
        self.warn_unused_mixin(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()  # a module's on_train_batch_start returned -1: no on_train_batch_end for that micro-batch

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.close()
        if stage == "fit":  # leave trainer.callbacks as the user built it
            self.callbacks = []
            if self in trainer.callbacks:
                trainer.callbacks.remove(self)

    def planned(self, trainer: Any) -> List[Any]:
        """The callbacks that attack this micro-batch."""
        return [cb for cb in self.callbacks if cb.wants_attack(trainer)]

    # -- automatic optimization --------------------------------------------------------------------------------
    def batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.manual_calls = 0
        self.close()
        if not pl_module.automatic_optimization:
            return
        self.plan = self.planned(trainer)
        if not self.plan:
            return
        self._batch = (copy_containers(batch), batch_idx)
        use_own = callable(getattr(pl_module, "adversarial_loss", None))
        scaler = compat.scaler_of(trainer)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        k = trainer.accumulate_grad_batches

        def forward() -> Any:
            saved, index = self._batch
            batch_copy = copy_containers(saved)
            if use_own:
                return compat.run_step(trainer, "adversarial_loss", (batch_copy, index))
            return compat.run_step(trainer, "training_step", compat.step_args(pl_module, batch_copy, index))

        def scaled(loss: torch.Tensor) -> torch.Tensor:  # as Lightning scales the clean loss
            if k != 1:
                loss = loss / k
            return scaler.scale(loss) if scaler is not None else loss

        def backward(loss: torch.Tensor) -> None:
            trainer.precision_plugin.backward(scaled(loss), pl_module, optimizer)

        self._scaled = scaled

        sync = BackwardSync(compat.ddp_module(trainer))
        self.step = AttackStep(
            [p for p in pl_module.parameters() if p.requires_grad], [cb.method for cb in self.plan], forward, backward,
            sync=sync, sync_last=compat.will_step_optimizer(trainer), grad_scale=1.0 / sync.world_size,
            grads_are_views=compat.is_fsdp(trainer), shard_sum=compat.shard_sum(trainer),
        )
        self._phase = "forward"
        if any(getattr(cb.method, "needs_logits", False) for cb in self.plan):
            self._capture(pl_module)
        self.step.before_forward()

    def _capture(self, pl_module: Any) -> None:
        """Keep the output of the next ``training_step`` call (the clean one): SMART and R3F need its logits."""
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if self._phase == "forward" and self._captured is None:
                self._captured = output
            return output

        object.__setattr__(pl_module, "training_step", training_step)
        self._capturing = pl_module

    def before_backward(self, pl_module: Any, root: torch.Tensor) -> None:
        """``root``: the tensor Lightning is about to backpropagate (the clean loss, divided and scaled)."""
        if self.step is not None and self._phase == "forward" and pl_module.automatic_optimization:
            self._phase = "backward"
            output, self._captured = self._captured, None
            self._watch = None
            with self._isolated(pl_module):  # without a captured output, the loss Lightning backpropagates: DDP's
                self.step.before_backward(output if output is not None else root)  # reducer finds the graph from it
            joined = self.step.take_joined()
            if joined is not None:
                join_clean_loss(root, self._scaled(joined))

    def after_backward(self, pl_module: Any) -> None:
        if self.step is None or self._phase != "backward" or not pl_module.automatic_optimization:
            return  # one attack per micro-batch: backward hooks that fire again inside it do nothing
        self._phase = "attacked"
        with self._isolated(pl_module):
            outcomes = self.step.after_backward()
        self._report(pl_module, self.plan, outcomes)

    def close(self) -> None:
        step, self.step, self._batch, self._phase, self._captured, self._watch = self.step, None, None, "", None, None
        module, self._capturing = self._capturing, None
        if module is not None and "training_step" in vars(module):
            object.__delattr__(module, "training_step")
        if step is not None:
            step.close()

    # -- manual optimization (the mixin) ------------------------------------------------------------------------
    def manual_backward(self, pl_module: Any, loss_fn: Callable[[], Any]) -> torch.Tensor:
        trainer = pl_module.trainer
        self.manual_calls += 1
        plan = self.planned(trainer)
        if not plan:
            loss = required_loss(loss_fn(), "adversarial_backward")
            pl_module.manual_backward(loss)
            return loss
        ddp = compat.ddp_module(trainer)
        sync = BackwardSync(ddp, prepares=False)  # manual_backward prepares the reducer itself

        step = AttackStep(
            [p for p in pl_module.parameters() if p.requires_grad], [cb.method for cb in plan], loss_fn,
            pl_module.manual_backward, sync=sync, sync_last=bool(ddp.require_backward_grad_sync) if ddp is not None else True,
            grad_scale=1.0 / sync.world_size, grads_are_views=compat.is_fsdp(trainer), shard_sum=compat.shard_sum(trainer),
        )
        self._watch = None
        loss, outcomes = run_micro_batch(step, loss_fn, "adversarial_backward", isolated=lambda: self._isolated(pl_module))
        self._report(pl_module, plan, outcomes)
        return loss

    # -- both ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _isolated(self, pl_module: Any) -> Iterator[None]:
        """Around the methods' phases: ``self.log`` silenced, :func:`in_adversarial_pass` true, buffers and metric
        states restored (after the backward passes too: autograd may have saved buffers, BatchNorm, BERT ids); on the
        first entry of a micro-batch, the module's public state after its clean pass is noted (side effects)."""
        if self._watch is None:
            self._watch = SideEffects(pl_module)
        guard = self.guard if self.guard is not None else StateGuard(pl_module)
        with silenced_logging(pl_module), adversarial_pass(pl_module), guard.preserved():
            yield

    def _report(self, pl_module: Any, plan: List[Any], outcomes: List[Outcome]) -> None:
        """Each callback records its outcome; a side effect of the re-run steps is warned about once per fit."""
        watch, self._watch = self._watch, None
        for cb, outcome in zip(plan, outcomes):
            cb.record(outcome, pl_module)
        changed = [name for name in (watch.changed() if watch is not None else []) if name not in self._warned]
        if changed:
            self._warned.update(changed)
            rank_zero_warn(
                f"lightning_adv: the adversarial passes re-ran {type(pl_module).__name__}'s step and changed "
                f"{', '.join('self.' + n for n in changed)} again. If that should happen once per batch, guard it with "
                "`if not lightning_adv.in_adversarial_pass(self): ...` (or define adversarial_loss(batch, batch_idx)).",
                category=UserWarning,
            )

    def warn_unused_mixin(self, trainer: Any, pl_module: Any) -> None:
        if pl_module.automatic_optimization or self.manual_calls or "manual" in self._warned or not self.planned(trainer):
            return
        self._warned.add("manual")
        names = ", ".join(type(cb).__name__ for cb in self.callbacks)
        warnings.warn(
            f"{names} attached, but {type(pl_module).__name__} uses manual optimization and its training_step "
            "did not call self.adversarial_backward(loss_fn): no attack ran. Mix lightning_adv.AdversarialMixin "
            "into the module and replace self.manual_backward(loss) by self.adversarial_backward(lambda: loss_fn(batch)).",
            UserWarning,
            stacklevel=2,
        )


def manual_backward(pl_module: Any, loss_fn: Callable[[], Any]) -> torch.Tensor:
    """The mixin's backward: through the Trainer's coordinator, or ``manual_backward(loss_fn())`` without one."""
    coordinator = Coordinator.of(pl_module.trainer)
    if coordinator is None:
        loss = required_loss(loss_fn(), "adversarial_backward")
        pl_module.manual_backward(loss)
        return loss
    return coordinator.manual_backward(pl_module, loss_fn)


__all__ = ["Coordinator", "Outcome", "manual_backward"]
