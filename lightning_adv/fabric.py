"""Adversarial training in a Lightning Fabric loop: :func:`adversarial_backward` replaces ``fabric.backward(loss)``.

The methods are built on the module that ``fabric.setup`` returned (or on ``model.module``: the parameters are
the same objects), the loss closure calls that module (so Fabric's precision, e.g. bf16 autocast, applies to
every pass), and every backward goes through ``fabric.backward``. Gradient accumulation is Fabric's own: divide
the loss by the number of micro-batches inside the closure and wrap the call in ``fabric.no_backward_sync``. Under
DDP the gradients are all-reduced once per optimizer step, at the last backward of the stepping micro-batch;
every other backward pass (the clean one, the inner adversarial ones, and all of those of the accumulating
micro-batches) stays local::

    import torch.nn.functional as F
    from lightning.fabric import Fabric
    from lightning_adv import AWP, FGM
    from lightning_adv.fabric import adversarial_backward

    fabric = Fabric(accelerator="cuda", devices=2, strategy="ddp", precision="bf16-mixed")
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    methods = [FGM(model, epsilon=1.0, emb_name="word_embeddings"), AWP(model, adv_lr=1.0, adv_eps=0.01)]
    k = 4                                                   # micro-batches per optimizer step
    for i, (ids, y) in enumerate(loader):
        stepping = (i + 1) % k == 0
        with fabric.no_backward_sync(model, enabled=not stepping):
            loss, outcomes = adversarial_backward(fabric, model, methods, lambda: F.cross_entropy(model(ids), y) / k)
        if stepping:
            optimizer.step()
            optimizer.zero_grad()

Supported strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ...); strategies that shard parameters or
gradients (FSDP, DeepSpeed, XLA, model parallel) are refused, as is ``DDPStrategy(gradient_as_bucket_view=True)``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_adv.core.method import Method
from lightning_adv.core.passes import required_loss
from lightning_adv.strategies import check_bucket_views, check_strategy
from lightning_adv.core.step import AttackStep, BackwardSync, Outcome, run_micro_batch

LossOutput = Union[torch.Tensor, Mapping[str, Any]]
WHERE = "lightning_adv.fabric.adversarial_backward"



def adversarial_backward(
    fabric: Any,
    model: nn.Module,
    methods: Union[Method, Sequence[Method]],
    loss_fn: Callable[[], LossOutput],
) -> Tuple[torch.Tensor, List[Outcome]]:
    """Backpropagate ``loss_fn()`` and every method's adversarial passes through ``fabric.backward``.

    One micro-batch: the clean forward and backward, then each method, in order, from this micro-batch's own
    clean gradient (add-methods such as FGM, PGD and FreeLB add their gradient, replace-methods such as AWP replace
    the clean one). ``.grad`` ends up holding the micro-batch's gradient added to what it held before, so
    accumulation over micro-batches loses nothing. Under DDP only the last backward of the call may all-reduce,
    and only when the call is not inside ``fabric.no_backward_sync(model)``: one all-reduce per optimizer step.

    Args:
        fabric: the :class:`lightning.fabric.Fabric` object.
        model: the module returned by ``fabric.setup(...)``.
        methods: the methods (:class:`~lightning_adv.core.Method` instances, built on ``model`` or on
            ``model.module``); an empty list makes this exactly ``fabric.backward(loss_fn())``.
        loss_fn: computes the loss of the current micro-batch by calling ``model`` (a tensor, or a mapping with a
            ``"loss"`` key, and ``"logits"`` for SMART/R3F); divided by the number of accumulated micro-batches.
            It is called once for the clean pass and once per adversarial pass. SMART's and R3F's regulariser is
            added to the loss it returns at full weight (not divided along with it), as in the plain-loop engine.

    Returns:
        The detached clean loss and each method's :class:`~lightning_adv.core.Outcome` (the adversarial loss, and
        whether the attack was skipped).

    Raises:
        TypeError: ``fabric`` is not a Fabric, ``model`` was not set up by it, a method is not a lightning_adv
            ``Method``, or ``loss_fn`` is not callable.
        ValueError: the strategy shards parameters or gradients, a method perturbs parameters that are not the
            model's trainable ones, or ``loss_fn()`` returned ``None``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning.fabric import Fabric
        >>> from lightning_adv import FGM
        >>> from lightning_adv.fabric import adversarial_backward
        >>> fabric = Fabric(accelerator="cpu", devices=1)
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
        >>> fgm = FGM(model, epsilon=1.0, emb_name="0.weight")
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> loss, outcomes = adversarial_backward(fabric, model, [fgm], lambda: nn.functional.cross_entropy(model(x), y))
        >>> optimizer.step()
        >>> [bool(o.skipped) for o in outcomes], bool(outcomes[0].loss > 0), loss.requires_grad
        ([False], True, False)
    """
    methods = _check(fabric, model, methods, loss_fn)
    ddp = _ddp_module(model)

    def backward(loss: torch.Tensor) -> None:
        fabric.backward(loss, model=model)

    if not methods:
        loss = required_loss(loss_fn(), WHERE)
        backward(loss)
        return loss.detach(), []

    sync = BackwardSync(ddp, prepares=True)  # fabric.backward does not prepare DDP's reducer: the engine does
    step = AttackStep(
        [p for p in model.parameters() if p.requires_grad], methods, loss_fn, backward, sync=sync,
        sync_last=bool(ddp.require_backward_grad_sync) if ddp is not None else True, grad_scale=1.0 / sync.world_size,
        grad_context=_differentiating,
    )
    loss, outcomes = run_micro_batch(step, loss_fn, WHERE)
    return loss.detach(), outcomes


@contextlib.contextmanager
def _differentiating() -> Iterator[None]:
    """Let SMART's ascent differentiate through the Fabric module's outputs with ``torch.autograd.grad``: under mixed
    precision Fabric's module registers a hook on them that refuses any backward ``fabric.backward`` did not start
    (it is a gradient with respect to the perturbation only: no parameter gradient, no loss scaling)."""
    from lightning.fabric import wrappers

    before = getattr(wrappers, "_in_fabric_backward", False)
    wrappers._in_fabric_backward = True
    try:
        yield
    finally:
        wrappers._in_fabric_backward = before


def _ddp_module(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The ``DistributedDataParallel`` wrapper inside the Fabric module, or None."""
    forward = model._modules.get("_forward_module")
    forward = getattr(forward, "_orig_mod", forward)  # torch.compile'd
    return forward if isinstance(forward, DistributedDataParallel) else None


def _check(fabric: Any, model: Any, methods: Any, loss_fn: Any) -> List[Method]:
    where = "lightning_adv.fabric.adversarial_backward"
    if not callable(getattr(fabric, "backward", None)) or getattr(fabric, "strategy", None) is None:
        raise TypeError(f"{where}: the first argument must be the lightning.fabric.Fabric object, got {type(fabric).__name__}.")
    if not isinstance(model, nn.Module) or "_forward_module" not in model._modules:
        raise TypeError(
            f"{where}: the model must be the module returned by fabric.setup(model, optimizer), got "
            f"{type(model).__name__}. Set it up first: `model, optimizer = fabric.setup(model, optimizer)`."
        )
    check_strategy(fabric.strategy, where)
    ddp = _ddp_module(model)
    check_bucket_views(ddp is not None and getattr(ddp, "gradient_as_bucket_view", False), where)
    if isinstance(methods, Method):
        methods = [methods]
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence):
        raise TypeError(f"{where}: methods must be a list of lightning_adv methods (FGM, AWP, ...), got {type(methods).__name__}.")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for i, method in enumerate(methods):
        if not isinstance(method, Method):
            raise TypeError(
                f"{where}: methods[{i}] is a {type(method).__name__}, not a lightning_adv method; pass instances such as "
                "lightning_adv.FGM(model, ...), AWP, PGD, FreeLB, SMART or R3F (the callbacks are for the Trainer)."
            )
        params = getattr(method, "named_params", None)
        foreign = [name for name, p in params or [] if id(p) not in trainable]
        if foreign:
            raise ValueError(
                f"{where}: methods[{i}] ({type(method).__name__}) perturbs {', '.join(foreign[:5])}, which "
                "is not a trainable parameter of this model: build the method on the model returned by fabric.setup "
                "(or on its .module)."
            )
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be a callable that returns the loss, got {type(loss_fn).__name__}.")
    return list(methods)


__all__ = ["adversarial_backward"]
