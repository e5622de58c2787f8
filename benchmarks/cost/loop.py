"""The hand-written training loop, with our methods (public API) and with the reference snippets.

Ours: ``method.attack_backward(closure, backward)`` after the clean backward (FGM, AWP, PGD, SAM), and
``lightning_adv.adversarial_backward(model, [method], loss_fn, backward)`` for the whole micro-batch (FreeLB perturbs
the clean pass too; R3F and SMART add a divergence from the clean logits, ``loss_fn`` returning
``{"loss", "logits"}``; Momentum-SAM moves the weights along the loop's AdamW momentum before the clean pass and
restores them after it; NEFTune noises the clean pass's embedding output); the snippets (``reference_snippets.py``)
run the same way, except two: SAM's (davda54/sam) runs as its source is used, ``first_step(zero_grad=True)``, the
pass, ``second_step()`` (the base step being the loop's), and Momentum-SAM's is an optimizer (MarlonBecker/MSAM's
``AdamW_MSAM``) that replaces the loop's AdamW in a plain step.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import nn

from cost.config import (
    LOGITS_METHODS, LR, METHODS, OPTIMIZER_METHODS, PARAMETER_METHODS, WHOLE_STEP_METHODS, peak_variants,
)
from cost.models import tensor_bytes


class SyncCounter:
    """Counts host-device synchronisations with ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only).

    ``counting()`` arms it for a region when :attr:`armed`; ``paused()`` leaves out a nested region (the user's
    loss closure and backward), so that what is counted is the attack's own arithmetic.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.armed = False
        self.count = 0
        self._mode: Any = 0

    @contextlib.contextmanager
    def counting(self, mode: str = "warn") -> Iterator[None]:
        if not (self.enabled and self.armed):
            yield
            return
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            self._mode = mode
            torch.cuda.set_sync_debug_mode(mode)
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                self._mode = 0
        self.count += sum(1 for r in records if "synchroniz" in str(r.message).lower())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if not self.enabled or not self._mode:
            yield
            return
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(self._mode)


def build_method(model: nn.Module, method: str, optimizer: torch.optim.Optimizer) -> Any:
    """Our method (public API); Momentum-SAM on ``optimizer``, whose momentum it reads."""
    import lightning_adv

    cls = getattr(lightning_adv, METHODS[method]["cls"])
    if method in OPTIMIZER_METHODS:
        return cls(model, optimizer, **METHODS[method]["kw"])
    return cls(model, **METHODS[method]["kw"])


def build_reference(model: nn.Module, method: str, optimizer: torch.optim.Optimizer) -> Any:
    """The reference snippet; Momentum-SAM's is an optimizer with ``optimizer``'s settings (lr, betas, eps,
    weight decay) on the same parameters, its own state."""
    import reference_snippets

    cls = getattr(reference_snippets, METHODS[method].get("ref", "Ref" + METHODS[method]["cls"]))
    if method in OPTIMIZER_METHODS:
        settings = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        return cls(model.parameters(), **settings, **METHODS[method]["kw"])
    return cls(model, **METHODS[method]["kw"])


class Loop:
    """A hand-written training loop on one fixed batch: AdamW, optional autocast and GradScaler.

    Variants (:meth:`variant`): ``fwd_bwd`` (forward and backward, no optimizer step: the unit of cost), ``plain``
    (a training step without attack), ``ours_<method>`` and ``ref_<method>`` (with ``references``).
    """

    def __init__(self, model: nn.Module, batch: Dict[str, torch.Tensor], device: torch.device, precision: str,
                 methods: Sequence[str], references: bool = True) -> None:
        self.model, self.batch, self.device, self.precision = model, batch, device, precision
        self.methods, self.references = list(methods), references
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.sync = SyncCounter(device)
        self.ours = {m: build_method(model, m, self.opt) for m in self.methods}
        self.ref: Dict[str, Any] = {}
        self.fresh_refs()
        self.probe: Optional[Callable[[], None]] = None  # called inside every adversarial closure and backward

    def fresh_refs(self) -> None:
        """New reference snippets: the reference PGD keeps its gradient backup after the attack (a copy of every
        gradient alive until its next attack), which must not count against the variant measured after it. The
        reference Momentum-SAM leaves the weights at its ascent point between steps: it moves them back first."""
        for ref in self.ref.values():
            if hasattr(ref, "move_back_from_momentumAscent"):
                ref.move_back_from_momentumAscent()
        if self.references:
            self.ref = {m: build_reference(self.model, m, self.opt) for m in self.methods}

    # -- the pieces ---------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss(self) -> torch.Tensor:
        with self.autocast():
            return self.model(**self.batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """The loop's AdamW step, or ``optimizer``'s (the reference Momentum-SAM), through the GradScaler in fp16."""
        optimizer = self.opt if optimizer is None else optimizer
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def _probe(self) -> None:
        if self.probe is not None:
            self.probe()

    def closure(self) -> torch.Tensor:
        """The adversarial loss (not counted for syncs)."""
        self._probe()
        with self.sync.paused():
            return self.loss()

    def logits_closure(self) -> Dict[str, torch.Tensor]:
        """The loss and the logits (R3F, SMART: every pass; not counted for syncs)."""
        self._probe()
        with self.sync.paused(), self.autocast():
            out = self.model(**self.batch)
        return {"loss": out.loss, "logits": out.logits}

    def forward_kw(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The loss from keyword inputs (RefFreeLB's ``inputs_embeds``)."""
        self._probe()
        with self.sync.paused(), self.autocast():
            return self.model(**inputs).loss

    def forward_out(self, **inputs: torch.Tensor) -> Any:
        """The model's output from keyword inputs (RefR3F's and RefSMART's ``inputs_embeds``)."""
        self._probe()
        with self.sync.paused(), self.autocast():
            return self.model(**inputs)

    def adv_backward(self, loss: torch.Tensor) -> None:
        self._probe()  # the state during the pass (FreeLB's delta exists once the forward ran)
        with self.sync.paused():
            self.backward(loss)

    def clean(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.backward(self.loss())

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the variants -------------------------------------------------------------------------------------------
    def fwd_bwd(self) -> None:
        self.clean()

    def plain(self) -> None:
        self.clean()
        self.optimizer_step()

    def ref_step(self, method: str) -> None:
        if method in OPTIMIZER_METHODS:  # the snippet is the optimizer: a clean step and its update (counted whole)
            self.clean()
            with self.sync.counting():
                self.optimizer_step(self.ref[method])
            return
        if method in WHOLE_STEP_METHODS:  # the snippet runs the whole micro-batch, its clean pass included
            self.opt.zero_grad(set_to_none=True)
            forward = self.forward_out if method in LOGITS_METHODS else self.forward_kw
            with self.sync.counting():
                self.ref[method].attack_backward(self.batch, forward, self.adv_backward)
        else:
            self.clean()
            with self.sync.counting():
                if method == "fgm":
                    self.ref["fgm"].attack()
                    self.adv_backward(self.closure())
                    self.ref["fgm"].restore()
                elif method == "sam":  # davda54/sam's loop; its second_step's base step is the loop's, below
                    self.ref["sam"].first_step(zero_grad=True)
                    self.adv_backward(self.closure())
                    self.ref["sam"].second_step()
                else:
                    self.ref[method].attack_backward(self.closure, self.adv_backward)
        self.optimizer_step()

    def ours_step(self, method: str, mode: str = "warn") -> None:
        from lightning_adv import adversarial_backward

        if method in WHOLE_STEP_METHODS:
            self.opt.zero_grad(set_to_none=True)
            closure = self.logits_closure if method in LOGITS_METHODS else self.closure
            with self.sync.counting(mode):
                adversarial_backward(self.model, [self.ours[method]], closure, self.adv_backward)
        else:
            self.clean()
            with self.sync.counting(mode):
                self.ours[method].attack_backward(self.closure, self.adv_backward)
        self.optimizer_step()

    def variant(self, name: str) -> Callable[[], None]:
        if name in ("fwd_bwd", "plain"):
            return getattr(self, name)
        side, method = name.split("_", 1)
        if side == "ref":
            return lambda: self.ref_step(method)
        return lambda: self.ours_step(method)

    # -- the attack arithmetic alone ----------------------------------------------------------------------------
    def snapshot_grads(self) -> None:
        """Keep a copy of the clean gradient, to time the attacks with a loss closure and backward that do nothing."""
        self.clean()
        self._grads = [(p, p.grad.detach().clone()) for p in self.model.parameters() if p.grad is not None]
        self.opt.zero_grad(set_to_none=True)
        self._no_loss = torch.zeros((), device=self.device)

    def _regrad(self, loss: torch.Tensor) -> None:
        """A backward that costs nothing and leaves the clean gradient (PGD reads every pass's gradient but the last)."""
        for p, g in self._grads:
            p.grad = g

    def _spare_grads(self) -> Callable[[torch.Tensor], None]:
        """A backward that costs nothing and leaves a copy of the clean gradient, made now (untimed): SAM's pass
        gradient, which the attack then owns (the kept clean copy is not handed out)."""
        spare = [(p, g.clone()) for p, g in self._grads]

        def backward(loss: torch.Tensor) -> None:
            for p, g in spare:
                p.grad = g

        return backward

    def time_arithmetic(self, name: str, clock: Callable[[], float]) -> float:
        """Seconds of one FGM/AWP/PGD/SAM attack without its forward and backward (``attack_backward`` with a closure
        returning a constant; the gradient reloaded beforehand, untimed). PGD's and SAM's backward puts a gradient
        back (PGD reads every pass's gradient but the last; SAM's snippet restores only the weights that hold a
        gradient, and ours replaces the clean gradient with the pass's)."""
        for p, g in self._grads:
            p.grad = g.clone()
        no_loss = self._no_loss
        side, method = name.split("_", 1)
        backward = self._regrad if method == "pgd" else self._spare_grads() if method == "sam" else (lambda loss: None)
        self.synchronize()
        t0 = clock()
        if name == "ref_fgm":
            self.ref["fgm"].attack()
            self.ref["fgm"].restore()
        else:
            (self.ref if side == "ref" else self.ours)[method].attack_backward(lambda: no_loss, backward)
        self.synchronize()
        elapsed = clock() - t0
        self.opt.zero_grad(set_to_none=True)
        return elapsed


def saved_state(loop: Loop) -> Dict[str, Any]:
    """Bytes held by each method's saved state during the attack: the largest value read inside the adversarial
    closure and backward. Ours: ``method.saved_bytes()``; the snippets: their backups. ``perturbed``: the bytes of
    the perturbed parameters; ``grads``: of all the gradients (the reference PGD copies them); FreeLB, R3F, SMART,
    NEFTune: ``delta``, the per-example perturbation ``method.target.delta`` [batch, tokens, hidden] (R3F, NEFTune:
    the noise). Momentum-SAM exposes neither (``None``: the peak-memory runs show it)."""
    out: Dict[str, Any] = {}
    for method in loop.methods:
        attack = loop.ours[method]
        if method in PARAMETER_METHODS:
            loop.clean()
            perturbed = tensor_bytes([p for p in attack.parameters if p.grad is not None])
            grads = tensor_bytes([p.grad for p in loop.model.parameters() if p.grad is not None])
            seen = {"ours": 0, "ref": 0}
            loop.probe = lambda: seen.__setitem__("ours", max(seen["ours"], attack.saved_bytes()))
            loop.ours_step(method)
            if loop.references:
                ref = loop.ref[method]
                loop.probe = lambda: seen.__setitem__("ref", max(seen["ref"], ref.saved_bytes()))
                loop.ref_step(method)
            out[method] = dict(perturbed=perturbed, grads=grads, **seen)
        elif not hasattr(attack, "target"):
            out[method] = dict(delta=None)
            continue
        else:
            seen_delta = {"delta": 0}

            def probe(target: Any = attack.target) -> None:
                if target.delta is not None:
                    seen_delta["delta"] = max(seen_delta["delta"], tensor_bytes([target.delta]))

            loop.probe = probe
            loop.ours_step(method)
            out[method] = dict(seen_delta)
        loop.probe = None
    loop.opt.zero_grad(set_to_none=True)
    return out


def sync_counts(loop: Loop) -> Dict[str, Any]:
    """CUDA: host-device synchronisations inside the attack arithmetic per step; ours once more under "error"."""
    if not loop.sync.enabled:
        return {}
    out: Dict[str, Any] = {}
    loop.sync.armed = True
    try:
        for m in loop.methods:
            for name in ([f"ref_{m}"] if loop.references else []) + [f"ours_{m}"]:
                loop.sync.count = 0
                loop.variant(name)()
                out[name] = loop.sync.count
        for m in loop.methods:
            try:
                loop.ours_step(m, mode="error")
                out[f"ours_{m}_error_mode"] = "ok"
            except RuntimeError as err:
                out[f"ours_{m}_error_mode"] = f"raised: {str(err).splitlines()[0][:120]}"
    finally:
        loop.sync.armed = False
    return out


def cuda_peaks(loop: Loop, steps: int) -> Dict[str, int]:
    """CUDA: ``torch.cuda.max_memory_allocated`` over ``steps`` steps of each loop variant, in this process."""
    out: Dict[str, int] = {}
    for v in peak_variants(loop.methods):
        loop.fresh_refs()
        fn = loop.variant(v)
        loop.opt.zero_grad(set_to_none=True)
        loop.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(loop.device)
        for _ in range(steps):
            fn()
        loop.synchronize()
        out[v] = torch.cuda.max_memory_allocated(loop.device)
    loop.opt.zero_grad(set_to_none=True)
    return out
