"""R3F (Aghajanyan et al., 2020): a symmetric KL between the logits at the embeddings and at noisy embeddings."""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from lightning_adv.core.checks import check_choice, check_module_path, check_non_negative
from lightning_adv.core.smoothness import SmoothnessMethod, is_regression, symmetric_kl
from lightning_adv.core.step import AttackStep, PassOutput


class R3F(SmoothnessMethod):
    """R3F: ``loss + r3f_lambda * symmetric_KL(f(x), f(x + noise))`` (fairseq ``examples/rxf``).

    The noise, ``U(-eps, eps)`` or ``N(0, eps)``, is added to the token-embedding output (detached, as there: the
    noisy branch trains everything above the embedding) on the real tokens; the symmetric KL is computed in
    float32 with gradients through both branches. A regression head (one logit) uses the squared error.
    Cost: one forward and the backward through it.

    Causal LM: when the step returns ``{"loss", "logits", "labels"}`` with logits ``[B, T, V]`` and token labels
    ``[B, T]`` (-100 where masked), the symmetric KL is taken per token and averaged over the positions that
    predict a label (:func:`~lightning_adv.core.smoothness.token_mask`: the logits at ``t`` predict
    ``labels[:, t + 1]``, as transformers shifts), padding and prompt left out.

    Args:
        model: the model (its input embedding found as :class:`~lightning_adv.core.EmbeddingOutput` says).
        eps: noise magnitude (>= 0); 0 adds nothing.
        r3f_lambda: weight of the regulariser (>= 0); 0 adds nothing.
        noise_type: ``"uniform"`` or ``"normal"``.
        embedding: dotted path of the input-embedding module; ``None`` finds it.
        generator: the random generator of the noise (default: the global one).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import R3F, adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> def loss_fn():
        ...     logits = model(x)
        ...     return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}
        >>> (outcome,) = adversarial_backward(model, [R3F(model, eps=1e-2, embedding="0")], loss_fn)
        >>> bool(outcome.loss >= 0), bool(outcome.skipped)
        (True, False)
    """

    name = "r3f"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 1e-5,
        r3f_lambda: float = 1.0,
        noise_type: Literal["uniform", "normal"] = "uniform",
        embedding: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.check_arguments(type(self).__name__, eps, r3f_lambda, noise_type, embedding)
        super().__init__(model, embedding, generator)
        self.eps, self.weight, self.noise_type = float(eps), float(r3f_lambda), noise_type

    @staticmethod
    def check_arguments(owner: str, eps: float, r3f_lambda: float, noise_type: str, embedding: Optional[str]) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, eps=eps, r3f_lambda=r3f_lambda)
        check_choice(owner, "noise_type", noise_type, ("uniform", "normal"))
        check_module_path(owner, "embedding", embedding)

    def enabled(self) -> bool:
        return self.eps != 0 and self.weight != 0

    def noise(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The noise for an embedding output, 0 on padding."""
        noise = torch.empty_like(output)
        if self.noise_type == "uniform":
            noise.uniform_(-self.eps, self.eps, generator=self.generator)
        else:
            noise.normal_(0.0, self.eps, generator=self.generator)
        return noise * mask.unsqueeze(-1).to(noise.dtype)

    def perturbed_logits(self, step: AttackStep, clean: PassOutput) -> Tuple[torch.Tensor, torch.Tensor]:
        self.target.arm(self.noise, detach=True)
        out = step.extra_forward()
        self.target.require_called()
        if out.logits is None:
            raise ValueError("R3F needs the logits of every pass: return {'loss': loss, 'logits': logits}.")
        return out.logits, torch.ones((), dtype=torch.bool, device=out.logits.device)

    def divergence(self, clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        if is_regression(clean):
            return F.mse_loss(perturbed.squeeze(-1), clean.squeeze(-1))
        return symmetric_kl(perturbed, clean)
