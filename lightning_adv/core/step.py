"""The engine: one micro-batch of adversarial training, shared by the callbacks, the mixin and plain loops.

:class:`AttackStep` owns the gradients of the micro-batch. It moves the gradients of earlier micro-batches
aside before the clean backward, gives every method the micro-batch's *clean* gradient as its direction, keeps
what each method contributes apart, and merges everything right before the last backward of the step, which
is the only one allowed to all-reduce under DDP. "Add" methods (FGM, PGD, FreeLB) add their adversarial
gradient; "replace" methods (AWP) replace the clean one. Every method restores what it perturbed itself (in
``finally``), and :meth:`AttackStep.close` puts back whatever is still aside, whatever was raised.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from torch import nn

from lightning_adv.core.grads import GradientStash
from lightning_adv.core.passes import BackwardSync, Outcome, PassOutput, SkipAttack, pass_output

__all__ = [
    "AttackStep", "BackwardSync", "Outcome", "PassOutput", "SkipAttack", "adversarial_backward", "check_composition",
    "join_clean_loss", "pass_output",
]

Grads = List[Optional[torch.Tensor]]


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def check_composition(methods: Sequence[Any]) -> None:
    """Raise ``ValueError`` for a list of methods whose composition is not defined, naming why.

    * A method that replaces the clean gradient (AWP) with one that extends the clean loss (SMART, R3F): the
      regulariser's gradient is part of the clean gradient, so the replacement would drop it silently.
    * Two methods of one class on a common module or parameter (two FreeLBs on one embedding under two names).
    """
    names = [type(m).__name__ for m in methods]
    replacing = [n for n, m in zip(names, methods) if getattr(m, "replaces_gradient", False)]
    extending = [n for n, m in zip(names, methods) if not getattr(m, "runs_after_backward", True)]
    if replacing and extending:
        raise ValueError(
            f"{' and '.join(extending)} with {' and '.join(replacing)} is not supported: {', '.join(extending)} add"
            f"{'s' * (len(extending) == 1)} a regulariser to the clean loss, whose gradient is part of the clean gradient "
            f"that {', '.join(replacing)} replace{'s' * (len(replacing) == 1)} by the gradient at perturbed weights: the "
            "regulariser would be dropped silently. Train with one of them, or combine the regulariser with FGM, PGD or "
            "FreeLB (they add to the clean gradient)."
        )
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            if type(a) is type(b) and _perturbed(a) & _perturbed(b):
                raise ValueError(
                    f"two {type(a).__name__} methods perturb the same module or parameters ({a.describe()}); they would "
                    "perturb it twice in one micro-batch. Keep one of them."
                )


def _perturbed(method: Any) -> frozenset:
    perturbs = getattr(method, "perturbs", None)
    return perturbs() if callable(perturbs) else frozenset()


class AttackStep:
    """One micro-batch: the clean pass, then every method's passes, with one merge of the gradients.

    Call :meth:`before_forward` before the clean forward, :meth:`before_backward` between the clean forward and
    its backward (then backpropagate the clean loss plus :meth:`take_joined`, if not None), :meth:`after_backward`
    after it, and :meth:`close` in ``finally``; :func:`adversarial_backward`
    does all of it for a plain loop. A method calls :meth:`clean_grads`, :meth:`zero_grad`, :meth:`forward` and
    :meth:`backward` while it runs.

    Args:
        params: the parameters whose gradients the step owns (the trainable parameters of the model).
        methods: the methods to run, in order.
        forward: computes the step's output at the current perturbation (a loss, or ``{"loss", "logits"}``;
            ``None`` skips the attack).
        backward: backpropagates a loss (scaling, accumulation and precision included); ``loss.backward()``
            by default.
        sync: controls the DDP all-reduce; ``sync_last``: whether the last backward must all-reduce.
        grad_scale: factor from ``.grad`` to the gradient the methods are defined on (``1 / world_size`` under
            DDP, where a rank holds its local part of the mean); only magnitude guards see it.
        grads_are_views: ``.grad`` are views into a gradient buffer owned elsewhere, whose shape and storage the
            owner may change between passes (FSDP's flat gradient with ``use_orig_params=True``): ``.grad`` is then
            never reassigned, only changed in place, and the earlier micro-batches' gradients stay in it (FSDP
            reduces them with the step's last backward): they are divided by FreeLB's clean weight before the clean
            backward, which the clean gradient is then multiplied by. Methods that read or clear the parameter
            gradients (``reads_gradient``: FGM, PGD, AWP) are refused, and at most one method may run after the
            backward (FreeLB).
        grad_context: a context in which :meth:`input_gradient` differentiates outside of ``backward`` (Fabric's
            wrapped module refuses a backward through its outputs that ``fabric.backward`` did not start).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        methods: Sequence[Any],
        forward: Callable[[], Any],
        backward: Optional[Callable[[torch.Tensor], None]] = None,
        sync: Optional[BackwardSync] = None,
        sync_last: bool = True,
        grad_scale: float = 1.0,
        grads_are_views: bool = False,
        grad_context: Optional[Callable[[], ContextManager[Any]]] = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.methods = list(methods)
        check_composition(self.methods)
        self._forward = forward
        self._backward = backward or _plain_backward
        self.sync = sync or BackwardSync()
        self.sync_last = sync_last
        self.grad_scale = grad_scale
        self.earlier = GradientStash(self.params)
        self._position: Dict[int, int] = {id(p): i for i, p in enumerate(self.params)}
        self._clean: Optional[Grads] = None
        self._base: Optional[Grads] = None
        self._base_weight = 1.0
        self._parts: List[Grads] = []
        self._current = 0
        self._merged = False
        after = [i for i, m in enumerate(self.methods) if getattr(m, "runs_after_backward", True)]
        self._last = after[-1] if after else -1
        self._skipped_before: Dict[int, Outcome] = {}
        # one method after the backward: the clean gradient stays in .grad until a method needs it cleared
        self._single = len(after) == 1
        self._views = grads_are_views
        self._grad_context = grad_context or contextlib.nullcontext
        # the product of the methods' clean weights (FreeLB: 1 / (1 + adv_steps)), applied to the clean gradient
        self._clean_weight = math.prod(float(getattr(m, "clean_weight", 1.0)) for m in self.methods)
        readers = [type(m).__name__ for m in self.methods if getattr(m, "reads_gradient", False)]
        if grads_are_views and readers:
            raise ValueError(
                f"{', '.join(readers)} perturb{'s' * (len(readers) == 1)} weights along the whole parameter gradient, "
                "which gradients that are views into a sharded buffer (FSDP) do not hold. Use a method that perturbs the "
                "embedding output (FreeLB, R3F, SMART), or train without sharding (single device or DDP)."
            )
        if grads_are_views and len(after) > 1:
            names = [type(self.methods[i]).__name__ for i in after]
            raise ValueError(
                f"{' and '.join(names)} all run after the backward, which keeps their gradients apart by moving `.grad` "
                "tensors; with gradients that are views into a shared buffer (FSDP) at most one of them can run. "
                "Keep one, or combine it with R3F/SMART (they run before the backward)."
            )
        self._live = False  # the clean gradient still lives in .grad
        self._backwards = 0
        self._joined: Optional[torch.Tensor] = None
        self.outcomes: List[Outcome] = []

    # -- phases, called by the driver ----------------------------------------------------------------------------
    def before_forward(self) -> None:
        """Before the clean forward: no DDP all-reduce until the last backward; methods install their hooks."""
        self.sync.hold()
        for method in self.methods:
            method.prepare(self)

    def before_backward(self, output: Any = None) -> None:
        """Between the clean forward and its backward: earlier gradients aside; methods that extend the clean
        loss (SMART, R3F) run their passes. Without methods after the backward, the clean backward is the step's
        last one: the DDP all-reduce is armed for it."""
        if self._last >= 0:
            if self._views:
                self._unweight_earlier()
            else:
                self.earlier.stash()
        clean = pass_output(output) if output is not None else None
        for i, method in enumerate(self.methods):
            self._current = i
            try:
                method.before_backward(self, clean)
            except SkipAttack:
                self._skipped_before[i] = Outcome(None, torch.ones((), dtype=torch.bool))
        if self._last < 0:
            self._merged = True
            self.sync.arm(self.sync_last)
            self.sync.prepare(output)

    def after_backward(self) -> List[Outcome]:
        """After the clean backward: every method from the clean gradient, then one merge.

        With one method after the backward, the clean gradient stays in ``.grad`` (no second gradient-sized
        buffer): FGM and FreeLB accumulate onto it, PGD moves it aside when it clears ``.grad``, and AWP uses it as
        scratch (a skipped AWP attack then leaves the micro-batch without gradient; a FreeLB attack skipped after some
        ascent passes keeps those passes). With several methods it is
        moved aside at once, and each method's contribution is kept apart until the merge.
        """
        self._base_weight = self._clean_weight
        if self._single:
            self._live = True
            if self._base_weight != 1.0:  # FreeLB: weight the clean gradient in place
                grads = [p.grad for p in self.params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, self._base_weight)
                self._base_weight = 1.0
        elif self._last >= 0:
            self._clean = self._base = self._take()
        for i, method in enumerate(self.methods):
            self._current = i
            if i in self._skipped_before:
                self.outcomes.append(self._skipped_before[i])
                continue
            try:
                self._backwards = 0
                outcome = method.run(self)
            except SkipAttack:
                outcome = Outcome(None, torch.ones((), dtype=torch.bool))
                self._skipped(method)
            self.outcomes.append(outcome)
            if not getattr(method, "runs_after_backward", True):
                continue
            if not self._merged and not self._views:  # views: the passes' gradients stay in .grad
                grads = self._take()
                if getattr(method, "replaces_gradient", False) and outcome.loss is not None:
                    self._base, self._base_weight = grads, 1.0
                else:
                    self._parts.append(grads)
        if not self._merged:  # no final pass ran (every attack skipped): the gradients as they are
            self._merge(replacing=False)
        return self.outcomes

    def _skipped(self, method: Any) -> None:
        """A pass returned None: drop what the method's passes added, keep the clean gradient where it still is."""
        weight = float(getattr(method, "clean_weight", 1.0))
        if not self._live:
            self.zero_grad()
            if self._base is not None and self._base is self._clean:  # a skipped method does not weight it (FreeLB)
                self._base_weight /= weight
        elif self._backwards == 0 and weight != 1.0 and self._views:
            warnings.warn(
                f"{type(method).__name__}: a pass returned None after the clean backward; with gradients that are views "
                "(FSDP) the earlier micro-batches' gradients share `.grad` with the clean one, so this micro-batch keeps "
                f"its clean gradient weighted by {weight:g}, as if attacked.",
                RuntimeWarning,
            )
        elif self._backwards == 0 and weight != 1.0:  # still only the (weighted) clean gradient in .grad
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / weight)

    def _unweight_earlier(self) -> None:
        """With views, before the clean backward: divide the earlier micro-batches' gradients by the clean weight
        that :meth:`after_backward` multiplies ``.grad`` by (FreeLB), so that ``.grad`` ends as ``earlier + weight *
        clean``, with no copy and no change of shape: FSDP may hold them unreduced and unsharded until the step's
        last backward (gradient accumulation), which reduces everything ``.grad`` holds."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self._clean_weight != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / self._clean_weight)

    def close(self) -> None:
        """Remove the methods' hooks, put back anything still aside, release the DDP sync (idempotent)."""
        try:
            for method in self.methods:
                method.finish()
        finally:
            if not self._merged and (self._clean is not None or self._live):
                self._merge(replacing=False)
            self.earlier.merge()
            self.sync.release()

    # -- what a method calls ---------------------------------------------------------------------------------------
    def clean_grads(self, params: Sequence[torch.Tensor], writable: bool = False) -> Grads:
        """The micro-batch's clean gradient of each of ``params`` (``None`` where it has none). With
        ``writable``, copies the caller may overwrite: the clean gradient stays whole, since a pass that returns
        None (a skipped attack) falls back to it."""
        if self._live:
            grads = [p.grad if id(p) in self._position else None for p in params]
            if writable and getattr(self.methods[self._current], "replaces_gradient", False):
                self._live = False  # the method overwrites it: nothing falls back to it
                return grads
        else:
            assert self._clean is not None, "clean_grads() is only available while the methods run"
            grads = [self._clean[self._position[id(p)]] if id(p) in self._position else None for p in params]
        if writable:
            grads = [None if g is None else g.clone() for g in grads]
        return grads

    def zero_grad(self) -> None:
        """Discard the gradients of the method's earlier passes (the clean gradient is moved aside, not lost)."""
        if self._views:
            raise RuntimeError(
                "AttackStep.zero_grad: not available with grads_are_views (the clean gradient cannot be moved aside)"
            )
        if self._live:
            self._live = False
            self._clean = self._base = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def forward(self, final: bool = False) -> PassOutput:
        """Run the step at the current perturbation. ``final``: the method's last pass; for the last method,
        the DDP all-reduce is armed before it and the gradients are merged into ``.grad`` before its backward."""
        last = final and self._current == self._last
        if last:
            self.sync.arm(self.sync_last)
        out = self._pass()
        if out is None:
            raise SkipAttack
        if last:
            self._merge(replacing=bool(getattr(self.methods[self._current], "replaces_gradient", False)))
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate a loss of this micro-batch as its clean loss is (accumulation, scaling, precision)."""
        self._backwards += 1
        self._backward(loss)

    def backward_with_clean(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, a loss of this micro-batch's extra forward, with the clean loss (SMART, R3F, from
        ``before_backward``). By default at once; with ``grads_are_views`` (FSDP) the driver adds it to the clean loss
        (:meth:`take_joined`), so that the micro-batch has one backward: FSDP reduces the gradient of one backward
        after its forwards, and a backward of the extra forward before the clean one left the ranks apart."""
        if not self._views:
            self.backward(loss)
            return
        self._joined = loss if self._joined is None else self._joined + loss

    def take_joined(self) -> Optional[torch.Tensor]:
        """What the clean backward must backpropagate with the clean loss (:meth:`backward_with_clean`), unscaled;
        None if nothing. A driver calls it after :meth:`before_backward` (see :func:`join_clean_loss`)."""
        joined, self._joined = self._joined, None
        return joined

    def input_gradient(self, loss: torch.Tensor, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient of ``loss`` with respect to ``tensor`` (a perturbation, a leaf that requires grad), with the
        parameters' ``.grad`` left as they are (SMART's ascent); ``None`` when ``loss`` does not depend on ``tensor``.

        ``torch.autograd.grad``; with ``grads_are_views`` (FSDP) a full backward instead, with ``.grad`` copied
        aside and written back in place: FSDP's backward hooks expect every backward to reach its flat parameters,
        and a backward that stops at ``tensor`` leaves the module holding unregistered parameter views, which the
        next forward writes back in place under the clean graph. Costs the parameter gradients and one copy."""
        if not loss.requires_grad:
            return None
        if not self._views:
            with self._grad_context():
                (grad,) = torch.autograd.grad(loss, tensor, allow_unused=True)
            return grad
        aside = GradientStash(self.params, in_place=True)
        aside.stash()
        try:
            tensor.grad = None
            loss.backward()
            grad, tensor.grad = tensor.grad, None
        finally:  # drop what this backward added, then put the earlier gradients back in place
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
            aside.merge()
        return grad

    def extra_forward(self) -> PassOutput:
        """A forward between the clean forward and its backward (SMART, R3F): no merge, no all-reduce."""
        out = self._pass()
        if out is None:
            raise SkipAttack
        return out

    def _pass(self) -> Optional[PassOutput]:
        for method in self.methods:
            method.before_pass(self)
        return pass_output(self._forward())

    # -- gradient bookkeeping ----------------------------------------------------------------------------------------
    def _take(self) -> Grads:
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def _merge(self, replacing: bool) -> None:
        if self._views:  # the gradients accumulate in .grad, the earlier ones included (nothing was moved aside)
            self._live, self._merged = False, True
            return
        self._live = False
        lists: List[Grads] = [self._take()]
        if not replacing and self._base is not None:
            if self._base_weight != 1.0:
                scaled = [g for g in self._base if g is not None]
                if scaled:
                    torch._foreach_mul_(scaled, self._base_weight)
            lists.append(self._base)
        lists += self._parts + [self.earlier.take()]
        into: List[torch.Tensor] = []
        add: List[torch.Tensor] = []
        for j, p in enumerate(self.params):
            values = [grads[j] for grads in lists if grads[j] is not None]
            p.grad = values[0] if values else None
            if len(values) > 1:
                into += [values[0]] * (len(values) - 1)
                add += values[1:]
        if add:
            torch._foreach_add_(into, add)
        self._clean = self._base = None  # no gradient-sized buffer outlives the merge besides .grad
        self._parts = []
        self._merged = True


def join_clean_loss(root: torch.Tensor, joined: Optional[torch.Tensor]) -> None:
    """Make the backward of ``root`` (the tensor a trainer is about to backpropagate, already scaled as it will be)
    also backpropagate ``joined`` (:meth:`AttackStep.take_joined`, scaled the same way), without changing its value:
    ``root += joined - joined.detach()`` in place, with a non-finite ``joined`` counted as 0 (its gradient is then 0)."""
    if joined is None:
        return
    joined = torch.nan_to_num(joined.to(root.dtype), 0.0, 0.0, 0.0)
    root.add_(joined - joined.detach())


def adversarial_backward(
    model: nn.Module,
    methods: Sequence[Any],
    loss_fn: Callable[[], Any],
    backward: Optional[Callable[[torch.Tensor], None]] = None,
) -> List[Outcome]:
    """One micro-batch of adversarial training in a plain loop: the clean forward and backward of
    ``loss_fn()`` and every method's passes; ``.grad`` ends up holding the step's gradient, added to what
    it held before (accumulation). Returns each method's :class:`Outcome`; the clean loss is ``loss_fn``'s.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import FGM, AWP, adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> loss_fn = lambda: nn.functional.cross_entropy(model(x), y)
        >>> outcomes = adversarial_backward(model, [FGM(model, emb_name="0.weight"), AWP(model)], loss_fn)
        >>> [bool(o.skipped) for o in outcomes], model[0].weight.grad is not None
        ([False, False], True)
    """
    step = AttackStep(model.parameters(), methods, loss_fn, backward)
    try:
        step.before_forward()
        output = loss_fn()
        step.before_backward(output)
        clean = pass_output(output)
        if clean is None:
            raise ValueError("adversarial_backward: loss_fn() returned None; it must return the loss of the batch.")
        joined = step.take_joined()
        step.backward(clean.loss if joined is None else clean.loss + joined)
        return step.after_backward()
    finally:
        step.close()
