"""NEFTune (Jain et al., 2023): uniform noise on the input-embedding output of the clean pass, in the form of
transformers' ``neftune_post_forward_hook``. A method on the engine's contract (``combine = "extend_loss"``: it
changes the clean pass and runs no pass of its own): no line of the engine knows it."""

from __future__ import annotations

import math
from typing import Any, FrozenSet, Literal, Optional, Sequence

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
    ``length="tokens"``: ``L`` is each example's number of real tokens (from the pad id) and padding gets none.

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
        magnitude = self.noise_alpha / torch.sqrt(lengths(mask).to(output.dtype) * output.size(2))
        return uniform * magnitude.view(-1, 1, 1) * mask.unsqueeze(-1).to(output.dtype)

    def prepare(self, step: AttackStep) -> None:
        self.target.attach()
        self.target.arm(self.noise)

    def run(self, step: AttackStep) -> Outcome:
        self.target.require_called()
        return Outcome(None, torch.zeros((), dtype=torch.bool))

    def finish(self) -> None:
        self.target.detach()
        self.target.delta = self.target.mask = None


__all__ = ["NEFTune"]
