"""NEFTune (Jain et al., 2023): uniform noise on the input-embedding output of the clean pass, in the form of
transformers' ``neftune_post_forward_hook``. A method on the engine's contract (``combine = "extend_loss"``: it
changes the clean pass and runs no pass of its own): no line of the engine knows it."""

from __future__ import annotations

import math
from typing import Any, FrozenSet, List, Literal, Optional, Sequence

import torch
from torch import nn

from lightning_adv.core.checks import check_choice, check_module_path, check_non_negative
from lightning_adv.core.embedding import EmbeddingOutput, lengths
from lightning_adv.core.method import Method
from lightning_adv.core.step import AttackStep, Outcome


class NEFTune(Method):
    """Adds ``U(-m, m)`` noise to the input-embedding output of the clean forward, ``m = noise_alpha / sqrt(L * d)``,
    while the embedding module is in training mode; no extra pass.

    ``length="padded"`` (the source's): ``L`` is the padded length of the batch and every position gets noise.
    ``length="tokens"``: ``L`` is each example's number of real tokens (from the pad id) and padding gets none;
    for packed sequences (several examples in one row, the model called with ``position_ids`` that restart at 0 at
    each example, as transformers' ``DataCollatorWithFlattening`` makes them), ``L`` is the number of real tokens
    of each packed example, from one restart of the position ids to the next.

    Composes with Momentum-SAM only: every other method runs passes (or perturbs the embedding output) that would
    not carry NEFTune's clean-pass noise, and is refused with the reason.

    Args:
        model: the model (its input embedding found as :class:`~lightning_adv.core.EmbeddingOutput` says).
        noise_alpha: the noise scale (>= 0); 0 adds nothing.
        length: ``"padded"`` or ``"tokens"``.
        embedding: dotted path of the input-embedding module; ``None`` finds it.
        generator: the random generator of the noise (default: the global one).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import adversarial_backward
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> neftune = NEFTune(model, noise_alpha=5.0, embedding="0")
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> (outcome,) = adversarial_backward(model, [neftune], lambda: nn.functional.cross_entropy(model(x), y))
        >>> noise = neftune.noise(torch.zeros(4, 3, 8), torch.ones(4, 3, dtype=torch.bool))
        >>> bool(noise.abs().max() <= 5.0 / (3 * 8) ** 0.5), bool(outcome.skipped), model[0].weight.grad is not None
        (True, False, True)
    """

    name = "neftune"
    combine = "extend_loss"
    needs_clean_pass = True

    def __init__(
        self,
        model: nn.Module,
        noise_alpha: float = 5.0,
        length: Literal["padded", "tokens"] = "padded",
        embedding: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_non_negative(owner, noise_alpha=noise_alpha)
        check_choice(owner, "length", length, ("padded", "tokens"))
        check_module_path(owner, "embedding", embedding)
        self.target = EmbeddingOutput(model, embedding, owner)
        self.noise_alpha, self.length, self.generator = float(noise_alpha), length, generator
        self.model = model
        self.position_ids: Optional[torch.Tensor] = None
        """The ``position_ids`` the model was last called with in this micro-batch (``length="tokens"``)."""
        self._pre_hooks: List[torch.utils.hooks.RemovableHandle] = []

    def enabled(self) -> bool:
        return self.noise_alpha != 0

    def compose(self, others: Sequence[Any]) -> None:
        clash = [type(m).__name__ for m in others if m.combine != "extend_loss" or m.perturbs() & self.perturbs()]
        if clash:
            raise ValueError(
                f"NEFTune with {', '.join(clash)} is not supported: NEFTune's noise is on the clean forward only, so their "
                "passes would run without it (transformers and TRL add it to every training forward). Train with NEFTune "
                "alone, or with Momentum-SAM."
            )

    def describe(self) -> str:
        return f"the output of {self.target.path or type(self.target.module).__name__}"

    def perturbs(self) -> FrozenSet[int]:
        return frozenset({id(self.target.module)})

    def noise(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The noise for an embedding output ``[B, T, H]`` and its mask of real tokens."""
        if not self.target.module.training:
            return torch.zeros_like(output)
        uniform = torch.empty_like(output).uniform_(-1, 1, generator=self.generator)
        if self.length == "padded":
            return uniform * (self.noise_alpha / math.sqrt(output.size(1) * output.size(2)))
        positions = self.position_ids
        if positions is not None and positions.shape == output.shape[:2]:
            count = segment_lengths(positions.to(output.device), mask).to(output.dtype)  # packed: per example
            magnitude = (self.noise_alpha / torch.sqrt(count * output.size(2))).unsqueeze(-1)
        else:
            magnitude = (self.noise_alpha / torch.sqrt(lengths(mask).to(output.dtype) * output.size(2))).view(-1, 1, 1)
        return uniform * magnitude * mask.unsqueeze(-1).to(output.dtype)

    def _remember_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.dim() == 2:
            self.position_ids = positions

    def prepare(self, step: AttackStep) -> None:
        self.target.attach()
        self.target.arm(self.noise)
        self.position_ids = None
        if self.length == "tokens" and not self._pre_hooks:  # the position ids of the transformers models' calls
            self._pre_hooks = [
                m.register_forward_pre_hook(self._remember_positions, with_kwargs=True)
                for m in self.model.modules() if callable(getattr(m, "get_input_embeddings", None))
            ]

    def run(self, step: AttackStep) -> Outcome:
        self.target.require_called()
        return Outcome(None, torch.zeros((), dtype=torch.bool))

    def finish(self) -> None:
        self.target.detach()
        self.target.delta = self.target.mask = None
        for handle in self._pre_hooks:
            handle.remove()
        self._pre_hooks, self.position_ids = [], None


def segment_lengths(position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For packed sequences, the number of real tokens (``mask``) of the example each position belongs to, ``[B, T]``
    (at least 1); an example starts where the position id is 0 (and at the first position of a row).

    >>> segment_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]]), torch.tensor([[True] * 5 + [False]])).tolist()
    [[3, 3, 3, 2, 2, 1]]
    """
    starts = position_ids == 0
    starts[:, 0] = True
    segment = starts.long().cumsum(1)  # 1, 2, ... per row
    counts = torch.zeros(position_ids.shape[0], position_ids.shape[1] + 1, dtype=torch.long, device=position_ids.device)
    counts.scatter_add_(1, segment, mask.long())
    return counts.gather(1, segment).clamp_min(1)


__all__ = ["NEFTune", "segment_lengths"]
