"""The arguments of the per-example evaluation attack: checks, metric names, the perturbed module."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lightning_adv.core.checks import check_choice, check_int, check_non_negative
from lightning_adv.core.embedding import EmbeddingOutput

Epsilons = Union[float, Sequence[float]]
ForwardOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def epsilon_key(epsilon: float) -> str:
    """The text of ``epsilon`` in metric names: ``0.5 -> "0.5"``, ``1.0 -> "1"``, ``1e-05 -> "1e-05"``."""
    short = format(epsilon, "g")
    return short if float(short) == epsilon else repr(float(epsilon))


def check_attack_args(
    owner: str,
    epsilon: Any,
    norm_type: Any,
    steps: Any,
    step_size: Any,
    random_start: Any = False,
    seed: Any = 0,
) -> Tuple[float, ...]:
    """Check the arguments of an attack (``ValueError`` naming the value and the rule); return the epsilons.

    >>> check_attack_args("RobustAccuracy", [0.5, 1], "l2", 3, None)
    (0.5, 1.0)
    >>> check_attack_args("RobustAccuracy", 1.0, "l1", 1, None)
    Traceback (most recent call last):
    ...
    ValueError: RobustAccuracy(norm_type='l1'): norm_type must be one of 'l2', 'linf'.
    """
    if isinstance(epsilon, (list, tuple)):
        if not epsilon:
            raise ValueError(f"{owner}(epsilon={epsilon!r}): epsilon must be a number >= 0 or a non-empty list of them.")
        for value in epsilon:
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{owner}(epsilon={epsilon!r}): every epsilon must be a finite number >= 0, got {value!r}.")
        epsilons = tuple(float(e) for e in epsilon)
        keys = [epsilon_key(e) for e in epsilons]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{owner}(epsilon={epsilon!r}): the epsilons must be distinct (one metric per epsilon).")
    else:
        check_non_negative(owner, epsilon=epsilon)
        epsilons = (float(epsilon),)
    check_choice(owner, "norm_type", norm_type, ("l2", "linf"))
    check_int(owner, "steps", steps, 1, "1: the fast-gradient attack; more: PGD")
    if step_size is not None:
        check_non_negative(owner, step_size=step_size)
    if not isinstance(random_start, bool):
        raise ValueError(f"{owner}(random_start={random_start!r}): random_start must be True or False.")
    check_int(owner, "seed", seed, 0, "the seed of the random start")
    return epsilons


def find_target(model: nn.Module, embedding: Optional[str], owner: str) -> EmbeddingOutput:
    """The :class:`EmbeddingOutput` of ``model``: as :func:`~lightning_adv.core.embedding.find_embedding` finds it,
    or, for a model without ``get_input_embeddings()`` and ``embedding=None``, its only ``nn.Embedding``."""
    try:
        return EmbeddingOutput(model, embedding, owner)
    except ValueError:
        found = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
        if embedding is not None or len(found) != 1:
            raise
        return EmbeddingOutput(model, found[0], owner)
