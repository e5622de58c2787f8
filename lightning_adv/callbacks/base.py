"""The Lightning layer: the base of the adversarial callbacks, thin wrappers over a core method."""

from __future__ import annotations

import os
import re
import zlib
from typing import Any, Dict, List, Optional

import torch

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from lightning_adv.callbacks import compat, progress
from lightning_adv.callbacks.coordinator import Coordinator
from lightning_adv.core.checks import NonNegativeInt, check_int
from lightning_adv.core.method import Method
from lightning_adv.core.step import Outcome
from lightning_adv.strategies import SUPPORTED, check_bucket_views, check_strategy, is_fsdp



class AdversarialCallback(Callback):
    """Base class of the adversarial-training callbacks: a core :class:`~lightning_adv.core.Method` run in every
    training micro-batch of an automatic-optimization module (or through :class:`~lightning_adv.AdversarialMixin`).

    A subclass takes the method's arguments, builds the method in :meth:`build_method` (called at ``on_fit_start``,
    after ``configure_model`` and ``setup`` built the model) and names what it attacks in :meth:`target_key`.
    The adversarial passes re-run ``training_step`` through the strategy (autocast, DDP wrapper) on a copy of
    the batch's containers, with ``self.log``/``log_dict`` silenced and torchmetrics states and module buffers
    restored afterwards, or call the module's ``adversarial_loss(batch, batch_idx)`` if it defines one. Their
    losses are divided by ``accumulate_grad_batches`` and go through the GradScaler, like the clean one.

    Logs, under the method's name (``fgm``, ``awp``, ``pgd``, ``freelb``, ``smart``, ``r3f``):

    * ``adv/<name>_loss`` every attacked step, on the progress bar: the loss of the last adversarial pass (SMART,
      R3F: the divergence they add), as returned by the step (before the division by ``accumulate_grad_batches``);
    * ``adv/<name>_grad_norm`` (FGM, PGD, AWP) or ``adv/<name>_delta_norm`` (FreeLB, SMART, R3F) every attacked
      step, to the loggers only: the attack's own size (the L2 norm of the clean gradient of the attacked parameters
      that the direction came from, the GradScaler's scale removed; or the mean over the examples of the L2 norm of
      each example's perturbation of the embedding output), to see what the magnitude arguments mean for the model;
    * at the end of every epoch in which it attacked: ``adv/<name>_loss_epoch`` (the mean of that epoch's
      ``adv/<name>_loss``), and the running totals over the run (resumes included) ``adv/<name>_attacks`` (attacked
      micro-batches) and ``adv/<name>_skipped`` (attacks skipped: a non-finite gradient, or a pass that returned None).
    """

    #: whether the callback runs under Lightning's ``FSDPStrategy`` (the methods that perturb the embedding output:
    #: FreeLB, R3F, SMART; the engine then changes FSDP's ``.grad`` views only in place)
    supports_fsdp: bool = False
    #: whether, under FSDP with several processes, it also runs with gradient accumulation (FreeLB, R3F; SMART's
    #: ascent copies ``.grad`` aside, and between micro-batches sharded FSDP holds ``.grad`` unsharded and unreduced)
    supports_fsdp_accumulation: bool = False
    #: whether, under FSDP, it also runs with mixed precision (SMART's ascent takes a backward of its own before the
    #: clean one, after which FSDP frees the low-precision parameters the clean pass's graph still needs)
    supports_fsdp_mixed_precision: bool = True
    #: why a callback that does not support FSDP refuses it (the first sentence of the error)
    fsdp_refusal: str = ("it perturbs weights along the whole gradient of each parameter, which FSDP keeps sharded in "
                         "its flat parameters")

    def __init__(self, start_epoch: NonNegativeInt = 0, start_step: NonNegativeInt = 0, seed: Optional[int] = None) -> None:
        owner = type(self).__name__
        check_int(owner, "start_epoch", start_epoch, 0, "the first epoch, counted from 0, that is attacked")
        check_int(owner, "start_step", start_step, 0, "the first optimizer step, counted from 0, that is attacked")
        if seed is not None:
            check_int(owner, "seed", seed, 0, "the seed of the callback's own random generator; None: from seed_everything")
        self.start_epoch = int(start_epoch)
        self.start_step = int(start_step)
        self.seed = None if seed is None else int(seed)
        self.log_name = ""  # the name in the log keys, set at fit start (suffixed by the target when a name is shared)
        self.method: Optional[Method] = None
        self._rng_state: Optional[torch.Tensor] = None  # a checkpoint's generator state, until the generator exists
        self._counts: Optional[torch.Tensor] = None  # [attacks, skipped] of this run, on the device
        self._restored = [0, 0]
        self._epoch_loss: Optional[torch.Tensor] = None  # [sum, count] of this epoch's adversarial losses
        self._never_warned = False

    # -- what a subclass provides ---------------------------------------------------------------------------
    def build_method(self, pl_module: torch.nn.Module) -> Method:
        """Return the core method for ``pl_module``; raise ``ValueError`` if it cannot be attacked."""
        raise NotImplementedError

    def target_key(self) -> Dict[str, Any]:
        """What the callback attacks (not its magnitudes): it tells two callbacks of one class apart in checkpoints."""
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.target_key())

    # -- counters -------------------------------------------------------------------------------------------
    @property
    def attacks(self) -> int:
        """Micro-batches attacked so far, over resumed runs."""
        return self._restored[0] + (int(self._counts[0]) if self._counts is not None else 0)

    @property
    def skipped(self) -> int:
        """Attacks skipped: a non-finite gradient (fp16 overflow), or an adversarial pass that returned None."""
        return self._restored[1] + (int(self._counts[1]) if self._counts is not None else 0)

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"attacks": self.attacks, "skipped": self.skipped}
        generator = getattr(self.method, "generator", None)
        if isinstance(generator, torch.Generator):
            state["rng"] = generator.get_state()
        elif self._rng_state is not None:
            state["rng"] = self._rng_state
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._restored = [int(state_dict.get("attacks", 0)), int(state_dict.get("skipped", 0))]
        self._counts = None
        self._rng_state = state_dict.get("rng")

    def _seed_generator(self, pl_module: LightningModule) -> None:
        """Give a method that draws noise (FreeLB's ``delta0``, R3F, SMART) the callback's own generator: seeded by
        ``seed``, else by ``seed_everything``'s seed (``PL_GLOBAL_SEED``) or torch's initial seed, mixed with the
        callback's target so that two callbacks draw differently; restored from a checkpoint when resuming, so
        that a resumed run draws what the uninterrupted one would."""
        if self.method is None or not hasattr(self.method, "generator"):
            return
        generator = torch.Generator(device=pl_module.device)
        if self.seed is not None:
            generator.manual_seed(self.seed)
        else:
            base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            generator.manual_seed((base + zlib.crc32(self.state_key.encode())) % 2**63)
        if self._rng_state is not None:
            generator.set_state(self._rng_state.cpu())
            self._rng_state = None
        self.method.generator = generator

    def wants_attack(self, trainer: Trainer) -> bool:
        """Whether this callback attacks the current micro-batch."""
        return (
            self.method is not None
            and self.method.enabled()
            and trainer.current_epoch >= self.start_epoch
            and trainer.global_step >= self.start_step
        )

    def record(self, outcome: Outcome, pl_module: LightningModule) -> None:
        """Count one attack and log its loss (one ``self.log`` per step; the counters once per epoch)."""
        device = outcome.skipped.device if outcome.loss is None else outcome.loss.device
        if self._counts is None:
            self._counts = torch.zeros(2, dtype=torch.long, device=device)
        self._counts[0] += 1
        self._counts[1] += outcome.skipped.to(self._counts.device)
        if self._epoch_loss is None:
            self._epoch_loss = torch.zeros(2, dtype=torch.float32, device=self._counts.device)
        if outcome.loss is not None:
            loss = outcome.loss.detach().float()
            self._epoch_loss += torch.stack([loss, torch.ones_like(loss)])
            pl_module.log(f"adv/{self._name()}_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        self._log_stats(pl_module)

    def _log_stats(self, pl_module: LightningModule) -> None:
        """The attack's own size, for the loggers only: ``adv/<name>_grad_norm`` (FGM, PGD, AWP: the clean gradient
        norm the direction came from, the GradScaler's scale removed) or ``adv/<name>_delta_norm`` (FreeLB, SMART,
        R3F: the mean per-example L2 norm of the perturbation of the embedding output). Tensors: no sync."""
        stats = getattr(self.method, "stats", None)
        if not stats:
            return
        scale = compat.scale_of(pl_module.trainer)
        for key, value in stats.items():
            if key == "grad_norm" and scale is not None:
                value = value / scale.to(value.device)
            pl_module.log(f"adv/{self._name()}_{key}", value.float(), on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        stats.clear()

    # -- hooks ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        progress.install(trainer)  # small adversarial losses in scientific notation on the bar
        owner = type(self).__name__
        if is_fsdp(trainer.strategy):
            if not self.supports_fsdp:
                raise ValueError(
                    f"{owner} does not support FSDPStrategy: {self.fsdp_refusal}. Use FreeLBCallback, R3FCallback or "
                    f"SMARTCallback (they perturb the embedding output), SAMCallback, or train with {SUPPORTED}."
                )
            if trainer.world_size > 1 and trainer.accumulate_grad_batches > 1 and not self.supports_fsdp_accumulation:
                raise ValueError(
                    f"{owner} under FSDPStrategy with several processes (world_size={trainer.world_size}) needs "
                    f"accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches}): between micro-batches sharded FSDP "
                    "holds `.grad` unsharded and unreduced, which it cannot set aside for its own gradient reading. Use a larger batch, "
                    "FreeLBCallback or R3FCallback, DDP ('ddp'), or FSDP on one device."
                )
            if "mixed" in str(getattr(trainer, "precision", "")) and not self.supports_fsdp_mixed_precision:
                raise ValueError(
                    f"{owner} under FSDPStrategy needs precision='32-true' (got {trainer.precision!r}): its ascent takes a "
                    "backward of its own before the clean one, after which FSDP frees the low-precision parameters that "
                    "the clean pass's graph still needs (seen on an H200: 'setStorage: ... storage of size 0'). Use "
                    "'32-true', R3FCallback or FreeLBCallback, or DDP ('ddp')."
                )
            if not getattr(trainer.strategy, "kwargs", {}).get("use_orig_params", True):
                raise ValueError(
                    f"{owner} needs FSDPStrategy(use_orig_params=True) (Lightning's default): with use_orig_params=False "
                    "the module's own parameters and gradients are hidden in FSDP's flat parameters."
                )
        else:
            check_strategy(trainer.strategy, owner, "; and FSDPStrategy for FreeLB, R3F and SMART")
            check_bucket_views(bool(compat.ddp_kwargs(trainer.strategy).get("gradient_as_bucket_view")), owner)
        if pl_module.automatic_optimization and is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise ValueError(
                f"{owner}: {type(pl_module).__name__}.training_step takes `dataloader_iter`, so Lightning gives the callbacks "
                "no batch to re-run the step on. Take `batch, batch_idx` instead, or use manual optimization with "
                "lightning_adv.AdversarialMixin.adversarial_backward(loss_fn)."
            )
        coordinator = Coordinator.register(trainer, self)
        keys = [cb.state_key for cb in coordinator.callbacks]
        if keys.count(self.state_key) > 1:
            raise ValueError(f"{owner}: two callbacks attack the same target ({self.state_key}); keep one of them.")
        self._counts, self._restored, self._epoch_loss = None, [0, 0], None  # a new fit counts from 0 (or the checkpoint)
        self.log_name = ""

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        progress.uninstall(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            self.method = self.build_method(pl_module)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        self._seed_generator(pl_module)
        when = f"from epoch {self.start_epoch}" + (f" and step {self.start_step}" if self.start_step else "")
        rank_zero_info(f"{type(self).__name__} attacks {self.method.describe()}, {when}.")
        self._never_warned = self._warn_if_never(trainer, steps=None)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the LightningModule's own on_fit_start (where a model may be put in train mode) and the data set-up
        if not self._never_warned:
            self._warn_if_never(trainer, steps=_total_steps(trainer))

    def _warn_if_never(self, trainer: Trainer, steps: Optional[float]) -> bool:
        """Warn (once) when this fit ends before ``start_epoch`` or ``start_step``: the callback would never attack.
        ``steps``: the fit's total optimizer steps when known (at ``on_train_start``), else only ``max_steps``."""
        owner = type(self).__name__
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
            rank_zero_warn(
                f"{owner}(start_epoch={self.start_epoch}) will never attack: this fit ends after max_epochs={max_epochs} "
                f"(epochs {_count(max_epochs)}, counted from 0). Lower start_epoch (0 attacks from the first epoch) or "
                "raise max_epochs.",
                category=UserWarning,
            )
            return True
        limit = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        if steps is not None and (limit is None or steps < limit):
            limit = steps
        if limit is not None and self.start_step >= limit:
            source = f"max_steps={trainer.max_steps}" if limit == trainer.max_steps else f"{int(limit)} optimizer steps"
            rank_zero_warn(
                f"{owner}(start_step={self.start_step}) will never attack: this fit ends after {source} (steps "
                f"{_count(int(limit))}, counted from 0). Lower start_step or train longer.",
                category=UserWarning,
            )
            return True
        return False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        progress.uninstall(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counts is None or self._epoch_loss is None:
            return
        epoch, self._epoch_loss = self._epoch_loss, None
        name = self._name()
        totals = self._counts.float() + torch.tensor(self._restored, dtype=torch.float32, device=self._counts.device)
        logged = {f"adv/{name}_attacks": totals[0], f"adv/{name}_skipped": totals[1]}
        logged[f"adv/{name}_loss_epoch"] = epoch[0] / epoch[1].clamp_min(1)  # 0 when every attack was skipped
        pl_module.log_dict(logged, on_step=False, on_epoch=True, batch_size=1)

    def target_label(self) -> str:
        """The target in a log key (``word_embeddings``), for two callbacks of one method on different targets."""
        values = [re.sub(r"[^0-9A-Za-z]+", "_", str(v)).strip("_") for v in self.target_key().values()]
        return "_".join(v if v and v != "None" else "auto" for v in values) or "auto"

    def _name(self) -> str:
        if self.log_name:
            return self.log_name
        return self.method.name if self.method is not None else "adv"


def _count(n: int) -> str:
    return "none" if n <= 0 else ("0" if n == 1 else f"0 to {n - 1}")


def _total_steps(trainer: Trainer) -> Optional[float]:
    """The optimizer steps of the whole fit (Lightning's estimate; inf when unbounded), None if it cannot tell."""
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - an estimate for a warning only: no estimate, no warning
        return None
