"""Lightning: short fits of one module, with and without an adversarial callback, timed through public hooks.

Each fit is a fresh ``Trainer`` (``max_steps = warm-up + timed steps``) on a dataset that repeats the batch. A step
is timed from the first callback's ``on_train_batch_start`` (ours, first in the list) to the module's own
``on_train_batch_end`` (Lightning calls it after every callback's). Its phases come from public points only:

* ``forward`` / ``backward``: the module's ``training_step`` and ``LightningModule.backward`` outside an adversarial
  pass, ``adv_forward`` / ``adv_backward`` inside one (``lightning_adv.in_adversarial_pass(module)``), with their
  call counts (load-free: the passes per step);
* ``update``: from ``Callback.on_before_optimizer_step`` (after the closure: forward, backward and the attack) to
  the end of the step: the optimizer's update and Lightning's bookkeeping after it;
* ``other``: the rest: Lightning's loop, and the adversarial callback's own work besides the model's passes (the
  method's arithmetic, the coordinator, logging; SMART's ascent gradient, a ``torch.autograd.grad`` that does not
  go through ``LightningModule.backward``). *other − other of the plain fit* is what the callback adds.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from cost.clocks import Sample, Stamp
from cost.config import LR, METHODS, PRECISIONS
from cost.loop import SyncCounter
from cost.opcount import Counting

PHASES = ("forward", "backward", "adv_forward", "adv_backward", "update")


class Phases:
    """Per step: seconds (both clocks) and call counts of each phase, outermost calls only."""

    def __init__(self) -> None:
        self.steps: List[Dict[str, Any]] = []
        self.current: Dict[str, Any] = {}
        self._depth = 0

    def reset(self) -> None:
        self.current = {p: dict(wall=0.0, cpu=0.0, calls=0) for p in PHASES}

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        self._depth += 1
        t0 = Stamp() if self._depth == 1 else None
        try:
            yield
        finally:
            self._depth -= 1
            if t0 is not None and self.current:
                s = t0.since()
                slot = self.current[phase]
                slot["wall"] += s.wall
                slot["cpu"] += s.cpu
                slot["calls"] += 1

    def end_step(self, total: Sample) -> None:
        step = dict(self.current, total=dict(wall=total.wall, cpu=total.cpu))
        step["other"] = {c: total.get(c) - sum(self.current[p][c] for p in PHASES) for c in ("wall", "cpu")}
        self.steps.append(step)
        self.current = {}


def lightning_parts(sync: SyncCounter) -> Dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_adv import in_adversarial_pass

    class BenchModule(L.LightningModule):
        """The same model and loss; logs the loss as a typical module does; returns ``{"loss", "logits"}`` (R3F and
        SMART need the logits; the others read the loss)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.timer: Optional[Any] = None

        def _phase(self, clean: str) -> contextlib.AbstractContextManager:
            if self.timer is None or self.timer.phases is None or not self.timer.phases.current:
                return contextlib.nullcontext()
            return self.timer.phases.timing(("adv_" + clean) if in_adversarial_pass(self) else clean)

        def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> Dict[str, torch.Tensor]:
            with sync.paused(), self._phase("forward"):
                out = self.model(**batch)
            self.log("train_loss", out.loss, on_step=True, on_epoch=False, batch_size=batch["labels"].shape[0])
            return {"loss": out.loss, "logits": out.logits}

        def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            with sync.paused(), self._phase("backward"):
                super().backward(loss, *args, **kwargs)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.timer is not None:
                self.timer.stop()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class StepTimer(Callback):
        """Put first in the callbacks: starts at ``on_train_batch_start``; the module stops it."""

        def __init__(self, device: torch.device, count_syncs: bool = False, phases: bool = True,
                     count_ops: Optional[nn.Module] = None) -> None:
            self.device, self.count_syncs, self.count_ops = device, count_syncs, count_ops
            self.phases = Phases() if phases else None
            self.counts: List[Dict[str, Any]] = []
            self._counting: Optional[Counting] = None
            self.times: List[Sample] = []
            self._t0: Optional[Stamp] = None
            self._update: Optional[Stamp] = None
            self._ctx: Optional[contextlib.AbstractContextManager] = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            pl_module.timer = self

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            pl_module.timer = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if self.count_syncs:
                sync.armed = True
                self._ctx = sync.counting()
                self._ctx.__enter__()
            if self.phases is not None:
                self.phases.reset()
            if self.count_ops is not None:
                self._counting = Counting(self.count_ops).__enter__()
            self._t0 = Stamp()

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self._update = Stamp()

        def stop(self) -> None:
            if self._t0 is None:
                return
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            total = self._t0.since()
            self.times.append(total)
            if self._counting is not None:
                self._counting.__exit__(None, None, None)
                self.counts.append(self._counting.result)
                self._counting = None
            if self.phases is not None:
                if self._update is not None:
                    s = self._update.since()
                    self.phases.current["update"] = dict(wall=s.wall, cpu=s.cpu, calls=1)
                self.phases.end_step(total)
            self._t0 = self._update = None
            if self._ctx is not None:
                self._ctx.__exit__(None, None, None)
                self._ctx = None
                sync.armed = False

    return dict(L=L, BenchModule=BenchModule, StepTimer=StepTimer)


class RepeatBatch(torch.utils.data.Dataset):
    def __init__(self, batch: Dict[str, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return self.batch


class LightningRunner:
    """Short fits of one module (sharing the loop's model): ``L_plain`` and ``L_<method>``."""

    def __init__(self, model: nn.Module, batch: Dict[str, torch.Tensor], device: torch.device, precision: str,
                 methods: Sequence[str]) -> None:
        self.sync = SyncCounter(device)
        self.parts = lightning_parts(self.sync)
        self.module = self.parts["BenchModule"](model)
        self.batch = {k: v.cpu() for k, v in batch.items()}
        self.device, self.precision, self.methods = device, precision, list(methods)
        self.phases: Dict[str, List[Dict[str, Any]]] = {}

    @staticmethod
    def callback_class(method: str) -> Any:
        import lightning_adv

        return getattr(lightning_adv, METHODS[method]["callback"])

    def callback(self, method: str) -> Any:
        return self.callback_class(method)(**METHODS[method]["kw"])

    def _fit(self, callbacks: List[Any], steps: int) -> None:
        """One fit of a fresh ``Trainer`` with ``callbacks``, ``steps`` optimizer steps on the repeated batch."""
        trainer = self.parts["L"].Trainer(
            accelerator=self.device.type, devices=1, max_steps=steps, precision=PRECISIONS[self.precision],
            callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )
        data = torch.utils.data.DataLoader(RepeatBatch(self.batch, steps), batch_size=None)
        trainer.fit(self.module, train_dataloaders=data)
        self.module.to(self.device)  # Lightning moves the module back to the CPU after fit; the loop shares the model

    def fit(self, variant: str, steps: int, warmup: int, count_syncs: bool = False, count_ops: bool = False) -> List[Sample]:
        timer = self.parts["StepTimer"](self.device, count_syncs, phases=not (count_syncs or count_ops),
                                        count_ops=self.module.model if count_ops else None)
        self._last = timer
        callbacks: List[Any] = [timer]
        if variant != "L_plain":
            callbacks.append(self.callback(variant[2:]))
        self._fit(callbacks, warmup + steps)
        if timer.phases is not None:
            self.phases.setdefault(variant, []).extend(timer.phases.steps[warmup:])
        return timer.times[warmup:]

    def alternating_callback(self, method: str) -> Any:
        """The method's callback, attacking every other step only: the odd optimizer steps (its public
        ``wants_attack``, as ``SAMCallback(interval=...)`` overrides it); on the even steps it is attached and idle."""
        base = self.callback_class(method)

        class Alternating(base):  # type: ignore[misc, valid-type]
            def wants_attack(self, trainer: Any) -> bool:
                return super().wants_attack(trainer) and trainer.global_step % 2 == 1

        Alternating.__name__ = Alternating.__qualname__ = base.__name__
        return Alternating(**METHODS[method]["kw"])

    def fit_alternating(self, method: str, pairs: int, warmup: int = 2) -> List[Dict[str, Sample]]:
        """One fit whose callback attacks every other step: ``warmup`` untimed steps (even: one plain, one attacked),
        then ``pairs`` adjacent pairs (a plain step, then an attacked one). Per pair: ``L_plain``, ``L_<method>`` and
        ``L_unit``, the forward+backward of the plain step (the phase timer's ``forward`` + ``backward``)."""
        if warmup % 2:
            raise ValueError(f"fit_alternating(warmup={warmup}): an even count keeps the pairs (plain, attacked)")
        timer, callback = self.parts["StepTimer"](self.device), self.alternating_callback(method)
        self._fit([timer, callback], warmup + 2 * pairs)
        if callback.attacks != warmup // 2 + pairs:
            raise RuntimeError(f"{method}: {callback.attacks} attacks in a fit of {warmup + 2 * pairs} alternating steps")
        times, phases = timer.times[warmup:], timer.phases.steps[warmup:]
        out = []
        for i in range(pairs):
            plain, attacked = phases[2 * i], phases[2 * i + 1]
            if plain["adv_forward"]["calls"] or attacked["adv_forward"]["calls"] != METHODS[method]["limit"]:
                raise RuntimeError(f"{method}: the fit did not alternate plain and attacked steps")
            unit = Sample(wall=plain["forward"]["wall"] + plain["backward"]["wall"],
                          cpu=plain["forward"]["cpu"] + plain["backward"]["cpu"])
            out.append({"L_plain": times[2 * i], f"L_{method}": times[2 * i + 1], "L_unit": unit})
            self.phases.setdefault("L_plain", []).append(plain)
            self.phases.setdefault(f"L_{method}", []).append(attacked)
        return out

    def count(self, variant: str) -> Dict[str, Any]:
        """The load-free counts (:mod:`cost.opcount`) of the second step of a fit."""
        self.fit(variant, steps=1, warmup=1, count_ops=True)
        return self._last.counts[-1]

    def sync_counts(self) -> Dict[str, Any]:
        """CUDA: synchronisations per step of each fit, forward and backward excluded."""
        if not self.sync.enabled:
            return {}
        out = {}
        for variant in ["L_plain"] + [f"L_{m}" for m in self.methods]:
            self.sync.count = 0
            self.fit(variant, steps=2, warmup=1, count_syncs=True)
            out[variant] = self.sync.count / 3
        return out

    def breakdown(self, clock: str) -> Dict[str, Dict[str, float]]:
        """Per variant: the median per step of every phase (ms) and of its call count; ``added``: the callback's
        ``other`` minus the plain fit's (ms, medians)."""
        out: Dict[str, Dict[str, float]] = {}
        for variant, steps in self.phases.items():
            row = {p: 1e3 * statistics.median(s[p][clock] for s in steps) for p in PHASES + ("other", "total")}
            row.update({f"{p}_calls": statistics.median(s[p]["calls"] for s in steps) for p in PHASES[:4]})
            out[variant] = row
        if "L_plain" in out:
            for variant, row in out.items():
                row["added"] = row["other"] - out["L_plain"]["other"]
        return out
