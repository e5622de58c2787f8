"""The shared perturb / forward / backward / restore loop of every parameter-space attack."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from lightning_adv.core.params import NamedParameters, with_grad

LossClosure = Callable[[], Optional[torch.Tensor]]
Backward = Callable[[torch.Tensor], None]


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


class SavedRows(NamedTuple):
    """The saved values of some rows (first dimension) of a parameter: the only rows an attack moved."""

    rows: torch.Tensor
    values: torch.Tensor


Saved = Union[None, torch.Tensor, SavedRows]
"""What is saved of one parameter: nothing yet (not perturbed), a full copy, or some of its rows."""


class ParameterAttack(ABC):
    """Base of the attacks: perturb some parameters from their gradient, backpropagate a loss, restore them.

    Subclasses define how many adversarial passes run (:attr:`num_passes`), the perturbation of one pass
    (:meth:`_perturb`) and what happens to the gradient before a pass (:meth:`_before_pass`). The saved
    copy of the perturbed parameters is the only state held across the adversarial forward and backward,
    and the parameters are restored in place in ``finally``, whatever the closure raises.

    On an accelerator nothing here synchronises the host with the device: norms, the finite check and the
    scaling stay on the device (``torch.where``, ``torch._foreach_*``), and the saved copy is taken whole
    before the first perturbation. On the CPU, where reading a value costs no synchronisation, the attacks
    branch on the norms in Python and save lazily, parameter by parameter, right before perturbing it
    (:meth:`_hold`), and only the rows they move when the gradient is zero on most rows (an embedding
    matrix, of which a batch touches few rows).
    """

    num_passes: int = 1

    def __init__(self, model: nn.Module, named_params: NamedParameters) -> None:
        self.model = model
        self.named_params = list(named_params)
        self._backup: Optional[List[Saved]] = None
        self._host = False  # whether the attack under way runs on the CPU (host-side branch, lazy saving)
        self._perturbed: List[torch.Tensor] = []
        self.last_skipped: Optional[torch.Tensor] = None
        """0-d bool tensor: whether the last attack was skipped for a non-finite gradient norm."""
        self.last_loss: Optional[torch.Tensor] = None
        """The detached loss of the last adversarial pass."""
        self.grad_scale: float = 1.0
        """Factor from the gradients in ``.grad`` to the gradient the attack is defined on: ``1 / world_size``
        under DDP, where a rank holds its local gradient of which the optimizer step sees the mean. Only
        size-dependent terms see it (AWP's 1e-6 guard); directions do not."""

    @property
    def parameters(self) -> List[torch.Tensor]:
        """The parameters this attack may perturb (trainable or not, as matched)."""
        return [p for _, p in self.named_params]

    def saved_bytes(self) -> int:
        """Bytes held by the saved state while an attack is under way (0 outside of one)."""
        total = 0
        for saved in self._backup or []:
            for t in (saved,) if isinstance(saved, torch.Tensor) else saved or ():
                total += t.numel() * t.element_size()
        return total

    def _save(self, params: List[torch.Tensor]) -> List[Saved]:
        """What is saved of ``params`` before the first perturbation: full copies on an accelerator; on the CPU,
        nothing yet (the attack calls :meth:`_hold` for each parameter before it perturbs it)."""
        self._host = on_host(params)
        if self._host:
            return [None] * len(params)
        return [p.detach().clone() for p in params]

    def _hold(self, i: int, rows: Optional[torch.Tensor] = None) -> Union[torch.Tensor, SavedRows]:
        """Save what is not saved yet of the ``i``-th perturbed parameter before it is perturbed (CPU only).

        Args:
            i: the index of the parameter in the list being attacked.
            rows: the indices of the rows about to be moved; ``None``: the whole parameter.

        Returns:
            The full saved copy, or the saved rows (those already saved first, then the new ones, which are
            still at their saved values): the parameter's values to restore, and to bound a perturbation by.
        """
        assert self._backup is not None
        p = self._perturbed[i].detach()
        saved = self._backup[i]
        if isinstance(saved, torch.Tensor):
            return saved
        if rows is None:
            full = p.clone()
            if saved is not None:  # some rows were moved already: their saved values
                full.index_copy_(0, saved.rows, saved.values)
            self._backup[i] = full
            return full
        if saved is None:
            entry = SavedRows(rows, p.index_select(0, rows))
        else:
            new = rows[~torch.isin(rows, saved.rows)]
            if new.numel() == 0:
                return saved
            entry = SavedRows(torch.cat([saved.rows, new]), torch.cat([saved.values, p.index_select(0, new)]))
        self._backup[i] = entry
        return entry

    def attack_backward(
        self,
        closure: LossClosure,
        backward: Optional[Backward] = None,
        before_last_pass: Optional[Callable[[], None]] = None,
    ) -> torch.Tensor:
        """Run the attack from the gradients in ``.grad`` and backpropagate the adversarial loss.

        Args:
            closure: computes the loss of the batch at the current (perturbed) parameters.
            backward: backpropagates that loss; defaults to ``loss.backward()``. Pass your own to scale the
                loss (``GradScaler``), divide it for accumulation, or go through a framework.
            before_last_pass: called right before the forward of the last adversarial pass, e.g. to merge
                the gradients of earlier micro-batches back or to arm a DDP gradient all-reduce.

        Returns:
            The detached loss of the last adversarial pass. A matched parameter without a gradient is left as
            it is; the passes run all the same, as in the reference (and, under DDP, the last backward still
            all-reduces the step's gradients).
        """
        backward = backward or _plain_backward
        params = self._begin()
        loss: Optional[torch.Tensor] = None
        try:
            for i in range(self.num_passes):
                finite = self._perturb(params)
                if i == 0:
                    self.last_skipped = ~finite
                self._before_pass()
                if i == self.num_passes - 1 and before_last_pass is not None:
                    before_last_pass()
                loss = closure()
                if loss is None:
                    raise RuntimeError(
                        f"{type(self).__name__}: the adversarial loss closure returned None; it must return the loss "
                        "tensor of the batch at the perturbed parameters."
                    )
                backward(loss)
        finally:
            self.restore()
        self.last_loss = loss.detach()
        return self.last_loss

    @contextmanager
    def perturbed(self) -> Iterator[torch.Tensor]:
        """Perturb once from the gradients in ``.grad`` and restore on exit; yields the 0-d bool "all finite".

        For evaluation under attack (no backward needed)::

            >>> import torch
            >>> from lightning_adv.core import FGM
            >>> emb = torch.nn.Embedding(5, 3)
            >>> fgm = FGM(emb, epsilon=1.0, emb_name="weight")
            >>> emb(torch.tensor([1, 2])).sum().backward()
            >>> before = emb.weight.detach().clone()
            >>> with fgm.perturbed():
            ...     moved = float((emb.weight - before).norm())
            >>> round(moved, 6), bool(torch.equal(emb.weight, before))
            (1.0, True)
        """
        params = self._begin()
        try:
            yield self._perturb(params)
        finally:
            self.restore()

    def _begin(self) -> List[torch.Tensor]:
        """Start an attack: the matched parameters that hold a gradient, remembered and saved for restore."""
        params = with_grad(self.parameters)
        self._perturbed = params
        self._backup = self._save(params)
        return params

    def restore(self) -> None:
        """Copy the saved values back into the perturbed parameters, in place (idempotent)."""
        backup, self._backup = self._backup, None
        if backup is not None:
            full = [(p, b) for p, b in zip(self._perturbed, backup) if isinstance(b, torch.Tensor)]
            with torch.no_grad():
                if full:
                    torch._foreach_copy_([p.detach() for p, _ in full], [b for _, b in full])
                for p, b in zip(self._perturbed, backup):
                    if isinstance(b, SavedRows):
                        p.detach().index_copy_(0, b.rows, b.values)
        self._perturbed = []

    @abstractmethod
    def _perturb(self, params: List[torch.Tensor]) -> torch.Tensor:
        """Perturb ``params`` in place from their ``.grad``; return a 0-d bool: all gradient norms finite."""

    def _before_pass(self) -> None:
        """Called after each perturbation, before the adversarial forward."""


def on_host(tensors: List[torch.Tensor]) -> bool:
    """Whether every tensor lives in host memory (the CPU).

    There, reading a norm costs no host-device synchronisation, so the attacks branch on it in Python: Python
    scalars, no work for a parameter with a zero gradient, and no pass over the weights to neutralise a skipped
    attack. On an accelerator they keep every value on the device instead.
    """
    return all(t.device.type == "cpu" for t in tensors)


def norm_and_rows(tensor: torch.Tensor) -> Tuple[float, Optional[torch.Tensor]]:
    """On the CPU: the L2 norm of ``tensor`` and, when at most half of its rows (first dimension) are not
    all zero, the indices of those rows (``None`` otherwise: the tensor is treated as dense).

    One pass over the tensor: the norm is taken from the norms of the rows. A row holding a nan or an inf
    counts as non-zero.
    """
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    if tensor.dim() < 2 or tensor.layout != torch.strided or tensor.shape[0] < 2:
        return float(torch.linalg.vector_norm(tensor, dtype=dtype)), None
    row_norms = torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.dim())), dtype=dtype)
    norm = float(torch.linalg.vector_norm(row_norms))
    non_zero = row_norms != 0
    if 2 * int(non_zero.sum()) > tensor.shape[0]:
        return norm, None
    return norm, non_zero.nonzero().squeeze(1)


def norms(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every tensor, stacked into one float32-or-wider vector on their device."""
    return torch.stack([n.to(torch.promote_types(n.dtype, torch.float32)) for n in torch._foreach_norm(tensors)])
