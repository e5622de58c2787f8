"""The engine: one micro-batch of adversarial training, shared by the callbacks, the mixin, Fabric and plain loops.

:class:`AttackStep` runs the phases of a micro-batch and applies what each method declares (the contract,
:mod:`lightning_adv.core.contract`: how its gradient combines with the clean one, its clean weight); it names no
method. The gradients live in a ledger (:mod:`lightning_adv.core.ledger`): the earlier micro-batches' are set aside
before the clean backward, every method gets the micro-batch's *clean* gradient as its direction, what each method
contributes is kept apart, and everything is merged right before the last backward of the step, which is the only
one allowed to all-reduce under DDP. Every method restores what it perturbed itself (in ``finally``), and
:meth:`AttackStep.close` puts back whatever is still aside, whatever was raised. :func:`run_micro_batch` drives the
phases for a loop that owns its forward and backward (a plain loop, the mixin, Fabric).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lightning_adv.core.contract import Contract
from lightning_adv.core.grads import GradientStash
from lightning_adv.core.ledger import ledger_for
from lightning_adv.core.passes import BackwardSync, Outcome, PassOutput, SkipAttack, pass_output, required_loss

__all__ = [
    "AttackStep", "BackwardSync", "Outcome", "PassOutput", "SkipAttack", "adversarial_backward", "check_composition",
    "join_clean_loss", "pass_output", "run_micro_batch",
]

Grads = List[Optional[torch.Tensor]]


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _skipped() -> Outcome:
    return Outcome(None, torch.ones((), dtype=torch.bool))


def check_composition(methods: Sequence[Contract], in_place: bool = False) -> None:
    """Raise ``ValueError`` for a list of methods whose composition is not defined, naming why.

    * Two methods that replace the clean gradient (AWP and SAM): only one replacement can be kept.
    * A method that replaces the clean gradient (AWP) with one that extends the clean loss (SMART, R3F): the
      regulariser's gradient is part of the clean gradient, so the replacement would drop it silently.
    * Two methods of one class on a common module or parameter (two FreeLBs on one embedding under two names).
    * Whatever a method refuses itself (:meth:`~lightning_adv.core.contract.Contract.compose`).
    * With gradients that are views into a sharded buffer (``in_place``, FSDP): a method that reads the parameter
      gradients per parameter (all but the ``sharded_gradient`` ones), or more than one method after the backward.
    """
    names = [type(m).__name__ for m in methods]
    replacing = [n for n, m in zip(names, methods) if m.combine == "replace"]
    extending = [n for n, m in zip(names, methods) if m.combine == "extend_loss"]
    if len(replacing) > 1:
        raise ValueError(
            f"{' and '.join(replacing)} all replace the micro-batch's clean gradient by the gradient at their own "
            "perturbed weights; only one replacement can be kept, so the others' passes would be paid for and dropped "
            "silently. Keep one of them (or combine it with FGM, PGD or FreeLB, which add)."
        )
    if replacing and extending:
        raise ValueError(
            f"{' and '.join(extending)} with {' and '.join(replacing)} is not supported: {', '.join(extending)} add"
            f"{'s' * (len(extending) == 1)} a regulariser to the clean loss, whose gradient is part of the clean gradient "
            f"that {', '.join(replacing)} replace{'s' * (len(replacing) == 1)} by the gradient at perturbed weights: the "
            "regulariser would be dropped silently. Train with one of them, or combine the regulariser with FGM, PGD or "
            "FreeLB (they add to the clean gradient)."
        )
    for i, method in enumerate(methods):
        method.compose([m for j, m in enumerate(methods) if j != i])
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            if type(a) is type(b) and a.perturbs() & b.perturbs():
                raise ValueError(
                    f"two {type(a).__name__} methods perturb the same module or parameters ({a.describe()}); they would "
                    "perturb it twice in one micro-batch. Keep one of them."
                )
    readers = [n for n, m in zip(names, methods) if m.reads_gradient and not m.sharded_gradient]
    if in_place and readers:
        raise ValueError(
            f"{', '.join(readers)} perturb{'s' * (len(readers) == 1)} weights along the whole parameter gradient, "
            "which gradients that are views into a sharded buffer (FSDP) do not hold. Use a method that perturbs the "
            "embedding output (FreeLB, R3F, SMART), or train without sharding (single device or DDP)."
        )
    after = [n for n, m in zip(names, methods) if m.combine != "extend_loss"]
    if in_place and len(after) > 1:
        raise ValueError(
            f"{' and '.join(after)} all run after the backward, which keeps their gradients apart by moving `.grad` "
            "tensors; with gradients that are views into a shared buffer (FSDP) at most one of them can run. "
            "Keep one, or combine it with R3F/SMART (they run before the backward)."
        )


class AttackStep:
    """One micro-batch: the clean pass, then every method's passes, with one merge of the gradients.

    Call :meth:`before_forward` before the clean forward, :meth:`before_backward` between the clean forward and
    its backward (then backpropagate the clean loss plus :meth:`take_joined`, if not None), :meth:`after_backward`
    after it, and :meth:`close` in ``finally``; :func:`run_micro_batch` does all of it for a loop that owns its
    forward and backward. A method calls :meth:`clean_grads`, :meth:`zero_grad`, :meth:`forward`,
    :meth:`extra_forward`, :meth:`backward`, :meth:`backward_with_clean`, :meth:`input_gradient` and
    :meth:`gradients_only_for` while it runs.

    Args:
        params: the parameters whose gradients the step owns (the trainable parameters of the model).
        methods: the methods to run, in order (objects implementing :class:`~lightning_adv.core.contract.Contract`).
        forward: computes the step's output at the current perturbation (a loss, or ``{"loss", "logits"}``;
            ``None`` skips the attack).
        backward: backpropagates a loss (scaling, accumulation and precision included); ``loss.backward()``
            by default.
        sync: controls the DDP all-reduce; ``sync_last``: whether the last backward must all-reduce.
        grad_scale: factor from ``.grad`` to the gradient the methods are defined on (``1 / world_size`` under
            DDP, where a rank holds its local part of the mean); only magnitude guards see it.
        grads_are_views: ``.grad`` are views into a gradient buffer owned elsewhere, whose shape and storage the
            owner may change between passes (FSDP's flat gradient with ``use_orig_params=True``): the gradients are
            then kept in place (:class:`~lightning_adv.core.ledger.InPlaceLedger`), methods that read the parameter
            gradients are refused, at most one method may run after the backward, and the perturbed losses of
            ``"extend_loss"`` methods join the clean backward.
        shard_sum: sums a tensor over the processes that hold the shards of the gradients (an all-reduce; FSDP with
            several processes), for the sums over all parameters of the ``sharded_gradient`` methods
            (:meth:`norm_over_shards`); None: every process holds whole gradients.
        grad_context: a context in which :meth:`input_gradient` differentiates outside of ``backward`` (Fabric's
            wrapped module refuses a backward through its outputs that ``fabric.backward`` did not start).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        methods: Sequence[Contract],
        forward: Callable[[], Any],
        backward: Optional[Callable[[torch.Tensor], None]] = None,
        sync: Optional[BackwardSync] = None,
        sync_last: bool = True,
        grad_scale: float = 1.0,
        grads_are_views: bool = False,
        shard_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        grad_context: Optional[Callable[[], ContextManager[Any]]] = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.methods = list(methods)
        check_composition(self.methods, in_place=grads_are_views)
        self._forward = forward
        self._backward = backward or _plain_backward
        self.sync = sync or BackwardSync()
        self.sync_last = sync_last
        self.grad_scale = grad_scale
        self._grad_context = grad_context or contextlib.nullcontext
        self._shard_sum = shard_sum
        self.ledger = ledger_for(self.params, math.prod(float(m.clean_weight) for m in self.methods), grads_are_views,
                                 reads=any(m.reads_gradient for m in self.methods))
        after = [i for i, m in enumerate(self.methods) if m.combine != "extend_loss"]
        self._last = after[-1] if after else -1  # the method whose final pass merges and all-reduces
        self._keep_clean_in_grad = len(after) == 1  # no second gradient-sized buffer for a single method
        self._current = 0
        self._backwards = 0
        self._skipped_before: Dict[int, Outcome] = {}
        self._joined: Optional[torch.Tensor] = None
        self.outcomes: List[Outcome] = []

    @property
    def earlier(self) -> GradientStash:
        """The gradients of earlier micro-batches, while they are set aside."""
        return self.ledger.earlier

    # -- phases, called by the driver ----------------------------------------------------------------------------
    def before_forward(self) -> None:
        """Before the clean forward: no DDP all-reduce until the last backward; methods install their hooks."""
        self.sync.hold()
        for method in self.methods:
            method.prepare(self)

    def before_backward(self, output: Any = None) -> None:
        """Between the clean forward and its backward: earlier gradients aside; ``"extend_loss"`` methods run their
        passes. Without methods after the backward, the clean backward is the step's last one: the DDP all-reduce is
        armed for it."""
        if self._last >= 0:
            self.ledger.set_aside_earlier()
        clean = pass_output(output) if output is not None else None
        for i, method in enumerate(self.methods):
            self._current = i
            try:
                method.before_backward(self, clean)
            except SkipAttack:
                self._skipped_before[i] = _skipped()
        if self._last < 0:
            self.ledger.merged = True
            self.sync.arm(self.sync_last)
            self.sync.prepare(output)

    def after_backward(self) -> List[Outcome]:
        """After the clean backward: every method from the clean gradient, then one merge.

        With one method after the backward, the clean gradient stays in ``.grad`` (no second gradient-sized
        buffer): FGM and FreeLB accumulate onto it, PGD moves it aside when it clears ``.grad``, and AWP uses it as
        scratch (a skipped AWP attack then leaves the micro-batch without gradient; a FreeLB attack skipped after some
        ascent passes keeps those passes). With several methods it is moved aside at once, and each method's
        contribution is kept apart until the merge.
        """
        if self._last >= 0:
            self.ledger.receive_clean(keep_in_grad=self._keep_clean_in_grad)
        for i, method in enumerate(self.methods):
            self._current = i
            if i in self._skipped_before:
                self.outcomes.append(self._skipped_before[i])
                continue
            self._backwards = 0
            try:
                outcome = method.run(self)
            except SkipAttack:  # a pass returned None: what its passes added is dropped
                outcome = _skipped()
                self.ledger.skipped(float(method.clean_weight), self._backwards, type(method).__name__)
            self.outcomes.append(outcome)
            if method.combine != "extend_loss" and not self.ledger.merged:
                self.ledger.settle(replaces=method.combine == "replace" and outcome.loss is not None)
        if not self.ledger.merged:  # no final pass ran (every attack skipped): the gradients as they are
            self.ledger.merge(replacing=False)
        return self.outcomes

    def close(self) -> None:
        """Remove the methods' hooks, put back anything still aside, release the DDP sync (idempotent)."""
        try:
            for method in self.methods:
                method.finish()
        finally:
            self.ledger.close()
            self.sync.release()

    # -- what a method calls ---------------------------------------------------------------------------------------
    def clean_grads(self, params: Sequence[torch.Tensor], writable: bool = False) -> Grads:
        """The micro-batch's clean gradient of each of ``params`` (``None`` where it has none). With
        ``writable``, copies the caller may overwrite: the clean gradient stays whole, since a pass that returns
        None (a skipped attack) falls back to it (a ``"replace"`` method gets the clean gradient itself as scratch
        when it lives in ``.grad``)."""
        return self.ledger.clean(params, writable, scratch=self.methods[self._current].combine == "replace")

    @property
    def grads_are_views(self) -> bool:
        """Whether ``.grad`` (and the parameters) are views into buffers owned elsewhere (FSDP): change them in place only."""
        return self.ledger.in_place

    def norm_over_shards(self, local: torch.Tensor) -> torch.Tensor:
        """The L2 norm over every process's shard of the gradients, from ``local``, this process's part of it (0-d);
        ``local`` itself when the gradients are whole. Every process must call it (a collective under FSDP)."""
        if self._shard_sum is None:
            return local
        return self._shard_sum(local.square()).sqrt()

    def zero_grad(self) -> None:
        """Discard the gradients of the method's earlier passes (the clean gradient is moved aside, not lost)."""
        self.ledger.clear_passes()

    @contextlib.contextmanager
    def gradients_only_for(self, params: Sequence[torch.Tensor]) -> Any:
        """Within it, a pass computes the gradients of ``params`` alone: the step's other parameters are frozen for its
        forward and backward (as Lightning's ``toggle_optimizer`` freezes the parameters of the other optimizers), so
        the backward skips their weight gradients, about a third of a forward+backward's work, and allocates none.
        For a pass whose gradients only direct the next perturbation and are then discarded (PGD's inner passes);
        the gradients it computes are the same, to the bit. A no-op with ``grads_are_views`` (FSDP owns
        ``requires_grad`` of its flat parameters)."""
        if self.ledger.in_place:
            yield
            return
        keep = {id(p) for p in params}
        frozen = [p for p in self.params if id(p) not in keep and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def forward(self, final: bool = False) -> PassOutput:
        """Run the step at the current perturbation. ``final``: the method's last pass; for the last method,
        the DDP all-reduce is armed before it and the gradients are merged into ``.grad`` before its backward."""
        last = final and self._current == self._last
        if last:
            self.sync.arm(self.sync_last)
        out = self._pass()
        if last:
            self.ledger.merge(replacing=self.methods[self._current].combine == "replace")
        return out

    def extra_forward(self) -> PassOutput:
        """A forward between the clean forward and its backward (``"extend_loss"`` methods): no merge, no all-reduce."""
        return self._pass()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate a loss of this micro-batch as its clean loss is (accumulation, scaling, precision)."""
        self._backwards += 1
        self._backward(loss)

    def backward_with_clean(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, a loss of this micro-batch's extra forward, with the clean loss (SMART, R3F, from
        ``before_backward``). By default at once; with ``grads_are_views`` (FSDP) the driver adds it to the clean loss
        (:meth:`take_joined`), so that the micro-batch has one backward: FSDP reduces the gradient of one backward
        after its forwards, and a backward of the extra forward before the clean one left the ranks apart."""
        if not self.ledger.in_place:
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
        if not self.ledger.in_place:
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

    def _pass(self) -> PassOutput:
        for method in self.methods:
            method.before_pass(self)
        out = pass_output(self._forward())
        if out is None:
            raise SkipAttack
        return out


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
    return run_micro_batch(step, loss_fn, "adversarial_backward")[1]


def run_micro_batch(
    step: AttackStep,
    loss_fn: Callable[[], Any],
    where: str = "adversarial_backward",
    isolated: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
) -> Tuple[torch.Tensor, List[Outcome]]:
    """The micro-batch driver of every loop that owns its forward and backward (a plain loop, the mixin, Fabric):
    the clean forward ``loss_fn()``, the methods' phases, the clean backward (through ``step.backward``, with what
    the methods join to it) and :meth:`AttackStep.close`, whatever is raised. ``isolated`` wraps the methods' phases
    (the mixin silences logging and preserves module state there). Returns the clean loss and each outcome."""
    try:
        step.before_forward()
        output = loss_fn()
        loss = required_loss(output, where)
        with isolated():
            step.before_backward(output)
        joined = step.take_joined()
        step.backward(loss if joined is None else loss + joined)
        with isolated():
            outcomes = step.after_backward()
    finally:
        step.close()
    return loss, outcomes
