"""Saving and restoring perturbed parameters, and the views the methods compute on: the one place where the
CPU and accelerator paths differ.

On an accelerator every perturbed parameter is copied whole before the first perturbation, and the methods
compute on the parameters and gradients themselves, with no host-device synchronisation. On the CPU, where
an embedding matrix of which a batch touches a few rows is the common target, only the rows whose gradient is
not zero are saved and computed on (a row whose gradient is zero does not move under any method here).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch


class SavedRows(NamedTuple):
    """The saved values of some rows (first dimension) of a parameter: the only rows an attack moved."""

    rows: torch.Tensor
    values: torch.Tensor


Saved = Union[None, torch.Tensor, SavedRows]


def on_host(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor lives in host memory (the CPU), where reading a value costs no synchronisation."""
    return all(t.device.type == "cpu" for t in tensors)


def norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every tensor, stacked into one float32-or-wider vector on their device."""
    return torch.stack([n.to(torch.promote_types(n.dtype, torch.float32)) for n in torch._foreach_norm(list(tensors))])


def zero_nonfinite(tensors: Sequence[torch.Tensor], finite: torch.Tensor) -> None:
    """Set every nan and inf of ``tensors`` to 0, in place, so that a step scaled by 0 (a skipped attack) leaves the
    weights as they are (``inf * 0`` is nan). ``finite``: a 0-d bool, whether they are all finite already; on the
    host, where reading it costs no synchronisation, the pass is skipped when it is true (one pass over the
    gradients fewer per attack); on an accelerator the pass always runs (no host-device synchronisation)."""
    if on_host(tensors) and bool(finite):
        return
    for t in tensors:
        t.nan_to_num_(0.0, 0.0, 0.0)


def touched_rows(grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The indices of the rows of ``grad`` that are not all zero, when they are at most half of its rows
    (``None`` otherwise: treat it as dense). A row holding a nan or an inf counts as touched."""
    if grad.dim() < 2 or grad.layout != torch.strided or grad.shape[0] < 2:
        return None
    flat = grad.flatten(1)
    if 2 * int(flat[:, 0].count_nonzero()) > grad.shape[0]:  # most rows touched, seen from one column (a dense weight)
        return None
    touched = (flat.amax(1) != 0) | (flat.amin(1) != 0)  # two vectorised reductions: ~6x faster than ne(0).any(1); a nan propagates
    rows = touched.nonzero().squeeze(1)
    return rows if 2 * rows.numel() <= grad.shape[0] else None


class Regions(NamedTuple):
    """What one perturbation computes on, one entry per parameter holding a gradient: the weights (the
    parameter itself, or a copy of its touched rows), their gradient, and their saved values."""

    index: List[int]
    weights: List[torch.Tensor]
    grads: List[torch.Tensor]
    saved: List[torch.Tensor]
    rows: List[Optional[torch.Tensor]]


class Snapshot:
    """The saved values of the parameters an attack moves; :meth:`restore` copies them back in place.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(4, 2))
        >>> snap = Snapshot([w])
        >>> grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
        >>> regions = snap.regions([grad])
        >>> regions.weights[0].add_(regions.grads[0]); snap.write_back(regions)  # doctest: +ELLIPSIS
        tensor(...)
        >>> float(w.detach().sum()), snap.nbytes()   # one row moved, one row saved
        (1.0, 16)
        >>> snap.restore(); float(w.detach().sum())
        0.0
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.host = on_host(self.params)
        self.saved: List[Saved] = [None if self.host else p.detach().clone() for p in self.params]

    def nbytes(self) -> int:
        """Bytes held by the saved values."""
        total = 0
        for saved in self.saved:
            for t in (saved,) if isinstance(saved, torch.Tensor) else saved or ():
                total += t.numel() * t.element_size()
        return total

    def hold(self, i: int, rows: Optional[torch.Tensor] = None) -> Union[torch.Tensor, SavedRows]:
        """Save what is not saved yet of parameter ``i`` (``rows``, or all of it) before it moves; return
        what is saved of it (the rows saved first, then the new ones)."""
        p, saved = self.params[i].detach(), self.saved[i]
        if isinstance(saved, torch.Tensor):
            return saved
        if rows is None:
            full = p.clone()
            if saved is not None:  # rows moved already: their saved values
                full.index_copy_(0, saved.rows, saved.values)
            self.saved[i] = full
            return full
        if saved is None:
            entry = SavedRows(rows, p.index_select(0, rows))
        else:
            new = rows[~torch.isin(rows, saved.rows)]
            if new.numel() == 0:
                return saved
            entry = SavedRows(torch.cat([saved.rows, new]), torch.cat([saved.values, p.index_select(0, new)]))
        self.saved[i] = entry
        return entry

    def regions(self, grads: Sequence[Optional[torch.Tensor]]) -> Regions:
        """The views to perturb from ``grads`` (one per parameter; ``None``: the parameter does not move)."""
        out = Regions([], [], [], [], [])
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            rows = touched_rows(g) if self.host else None
            saved = self.hold(i, rows)
            out.index.append(i)
            if isinstance(saved, SavedRows):
                out.weights.append(p.detach().index_select(0, saved.rows))
                out.grads.append(g.index_select(0, saved.rows))
                out.saved.append(saved.values)
                out.rows.append(saved.rows)
            else:
                out.weights.append(p.detach())
                out.grads.append(g)
                out.saved.append(saved)
                out.rows.append(None)
        return out

    def write_back(self, regions: Regions) -> None:
        """Copy the rows computed on copies back into their parameters."""
        for i, w, rows in zip(regions.index, regions.weights, regions.rows):
            if rows is not None:
                self.params[i].detach().index_copy_(0, rows, w)

    def restore(self) -> None:
        """Copy the saved values back into the parameters, in place (idempotent)."""
        saved, self.saved = self.saved, [None] * len(self.params)
        full = [(p.detach(), s) for p, s in zip(self.params, saved) if isinstance(s, torch.Tensor)]
        with torch.no_grad():
            if full:
                torch._foreach_copy_([p for p, _ in full], [s for _, s in full])
            for p, s in zip(self.params, saved):
                if isinstance(s, SavedRows):
                    p.detach().index_copy_(0, s.rows, s.values)
