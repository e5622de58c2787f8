"""Selecting the parameters an attack perturbs, by name, with errors that say how to fix a bad name."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

NamedParameters = List[Tuple[str, nn.Parameter]]


def match_parameters(module: nn.Module, pattern: str) -> NamedParameters:
    """Return the parameters whose name contains ``pattern``, once each, in registration order.

    Names are searched over every alias (``remove_duplicate=False``), so a tied parameter such as a
    language-model head that shares the word-embedding matrix is found under either name, and it is
    returned only once: perturbing it twice would double the perturbation.

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> [name for name, _ in match_parameters(model, "weight")]
        ['0.weight', '1.weight']
    """
    seen: set[int] = set()
    matched: NamedParameters = []
    for name, param in module.named_parameters(remove_duplicate=False):
        if pattern in name and id(param) not in seen:
            seen.add(id(param))
            matched.append((name, param))
    return matched


def select_trainable(module: nn.Module, pattern: str, *, owner: str, argument: str, hint: str) -> NamedParameters:
    """Like :func:`match_parameters`, but only trainable parameters, and raise when there is none.

    Args:
        module: the model whose parameters are searched.
        pattern: the substring a parameter name must contain.
        owner: the class the pattern was given to, for the error message (e.g. ``"FGMCallback"``).
        argument: the argument that holds the pattern (e.g. ``"emb_name"``).
        hint: a substring that typical candidates contain (e.g. ``"embed"``), listed in the error.

    Raises:
        ValueError: no trainable parameter matches; the message lists candidates and frozen matches.
    """
    matched = match_parameters(module, pattern)
    trainable = [(n, p) for n, p in matched if p.requires_grad]
    if trainable:
        sparse = [f"{n}.weight" for n, m in module.named_modules() if getattr(m, "sparse", False) is True
                  and any(getattr(m, "weight", None) is p for _, p in trainable)]
        if sparse:
            raise ValueError(
                f"{owner}({argument}={pattern!r}) matches {', '.join(sparse)} of an nn.Embedding(sparse=True), whose "
                "gradient is sparse: weight-space attacks need dense gradients. Build the embedding with sparse=False, "
                "or perturb its output per example instead (FreeLB, R3F, SMART)."
            )
        return trainable
    if matched:
        frozen = ", ".join(n for n, _ in matched[:8])
        raise ValueError(
            f"{owner}({argument}={pattern!r}) matches only frozen parameters (requires_grad=False): {frozen}. "
            f"Unfreeze them, pass an {argument} that matches a trainable parameter, or, for a frozen embedding "
            "(PEFT/LoRA), perturb its output per example instead (FreeLB, R3F, SMART), which needs no trainable weight."
        )
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad]
    candidates = [n for n in names if hint in n.lower()] or names
    shown = ", ".join(candidates[:10]) + (", ..." if len(candidates) > 10 else "")
    raise ValueError(
        f"{owner}({argument}={pattern!r}) matches no trainable parameter of {type(module).__name__}. "
        f"Pass an {argument} that is a substring of one of these names: {shown or '(the module has no trainable parameter)'}."
    )


def with_grad(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The parameters that take part in this backward: trainable and holding a gradient."""
    return [p for p in params if p.requires_grad and p.grad is not None]
