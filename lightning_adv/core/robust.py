"""Robust accuracy: each example attacked alone, in its own ball around the output of the input-embedding module.

:class:`EmbeddingAttack` perturbs the embedding output ``[B, T, H]`` of a batch with one ``delta`` per example,
restricted to the example's real tokens (``delta`` is 0 on padding) and bounded by ``epsilon`` in the L2 norm
over the example's ``T * H`` values or in the L-inf norm. The loss attacked is the sum of the per-example
cross-entropies, so that each example's gradient is its own: the result of an example does not depend on the
other examples of its batch, on the batch size or on the order (for a model without interaction between the
examples of a batch: eval mode, padding masked). :func:`robust_accuracy` runs it over evaluation batches in a
hand-written loop; :class:`~lightning_adv.callbacks.robust.RobustAccuracy` runs it in Lightning's validation and
test loops.

Only ``delta`` gets a gradient (``torch.autograd.grad``): parameters' ``.grad`` are never touched and the
embedding weight needs no gradient (frozen, tied and PEFT embeddings work). The attack's arithmetic runs in
float32 (float64 for a float64 model) whatever the model's precision, with no host synchronisation.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Tuple

import torch
from torch import nn

from lightning_adv.core.embedding_attack import AttackResult, EmbeddingAttack
from lightning_adv.core.robust_args import Epsilons, ForwardOutput, check_attack_args, epsilon_key, find_target

__all__ = ["AttackResult", "EmbeddingAttack", "Epsilons", "ForwardOutput", "RobustTally", "check_attack_args",
           "epsilon_key", "find_target", "robust_accuracy"]


class RobustTally:
    """Sums of per-example values on the device (no host synchronisation until :meth:`compute`).

    >>> tally = RobustTally()
    >>> tally.update({"robust_acc@1": torch.tensor([1.0, 0.0, 1.0, 1.0])})
    >>> tally.compute()
    {'robust_acc@1': 0.75}
    """

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.count: Optional[torch.Tensor] = None

    def update(self, values: Dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            total = value.detach().double().sum() if value.device.type != "mps" else value.detach().sum()
            self.sums[key] = self.sums[key] + total if key in self.sums else total
            if self.count is None:
                self.count = torch.zeros((), dtype=total.dtype, device=total.device)
        if values:
            self.count = self.count + next(iter(values.values())).shape[0]

    def all_reduce(self) -> None:
        """Sum the tallies of all processes (when ``torch.distributed`` is initialised); every process must call
        it, after at least one batch."""
        if self.count is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        keys = sorted(self.sums)  # the same order on every process
        stacked = torch.stack([self.sums[k] for k in keys] + [self.count])
        torch.distributed.all_reduce(stacked)
        reduced = dict(zip(keys, stacked[:-1]))
        self.sums = {k: reduced[k] for k in self.sums}
        self.count = stacked[-1]

    def compute(self) -> Dict[str, float]:
        """The mean of each value over all examples seen."""
        if self.count is None:
            return {}
        means = torch.stack(list(self.sums.values())) / self.count.clamp_min(1)
        return dict(zip(self.sums, means.tolist()))


def robust_accuracy(
    model: nn.Module,
    forward_fn: Callable[[Any], Tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[Any],
    epsilon: Epsilons = 1.0,
    norm_type: Literal["l2", "linf"] = "l2",
    steps: int = 1,
    step_size: Optional[float] = None,
    random_start: bool = False,
    embedding: Optional[str] = None,
    seed: int = 0,
    sync: bool = True,
) -> Dict[str, float]:
    """Accuracy under a per-example embedding-output attack (:class:`EmbeddingAttack`), over evaluation batches.

    Args:
        model: the model, in eval mode (a model in training mode is used as is, with a warning).
        forward_fn: ``forward_fn(batch) -> (logits, labels)`` for a batch of ``batches`` (move it to the device
            there); ``module.robust_forward`` of a LightningModule that follows the RobustAccuracy protocol.
        batches: the evaluation batches (a DataLoader, or ``[batch]`` for a single one).
        epsilon, norm_type, steps, step_size, random_start, embedding, seed: as in :class:`EmbeddingAttack`; the
            random start is re-seeded with ``seed`` at every call.
        sync: sum the counts of all processes when ``torch.distributed`` is initialised.

    Returns:
        The means over all examples: ``clean_acc``, ``clean_loss``, and per epsilon ``robust_acc@<eps>`` and
        ``robust_loss_gain@<eps>`` (mean adversarial minus mean clean cross-entropy); with a single epsilon given
        as a number, ``robust_acc`` too.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2)).eval()
        >>> data = [(torch.randint(0, 20, (4, 3)), torch.randint(0, 2, (4,))) for _ in range(3)]
        >>> metrics = robust_accuracy(model, lambda b: (model(b[0]), b[1]), data, epsilon=[0.0, 0.5], embedding="0")
        >>> sorted(metrics)
        ['clean_acc', 'clean_loss', 'robust_acc@0', 'robust_acc@0.5', 'robust_loss_gain@0', 'robust_loss_gain@0.5']
        >>> metrics["robust_acc@0"] == metrics["clean_acc"], metrics["robust_loss_gain@0"]
        (True, 0.0)
    """
    attack = EmbeddingAttack(model, epsilon, norm_type, steps, step_size, random_start, embedding, seed, owner="robust_accuracy")
    if model.training:
        warnings.warn("robust_accuracy: the model is in training mode (dropout on); call model.eval() for an evaluation.", stacklevel=2)
    tally = RobustTally()
    for batch in batches:
        tally.update(attack.run(lambda: forward_fn(batch)).per_example())
    if sync:
        tally.all_reduce()
    return tally.compute()


__all__: List[str] = ["AttackResult", "EmbeddingAttack", "RobustTally", "check_attack_args", "epsilon_key", "robust_accuracy"]
