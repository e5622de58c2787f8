"""SMART (Jiang et al., ACL 2020): smoothness-inducing adversarial regularisation on the embedding output."""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from lightning_adv.core.checks import check_choice, check_int, check_module_path, check_non_negative
from lightning_adv.core.smoothness import SmoothnessMethod, is_regression, select_tokens, stable_kl, sym_kl_criterion, token_mask
from lightning_adv.core.step import AttackStep, PassOutput


class SMART(SmoothnessMethod):
    """SMART: ``loss + adv_alpha * symmetric_KL(f(x), f(x + delta))`` with ``delta`` found by ascent
    (mt-dnn ``SmartPerturbation``).

    ``delta`` starts as ``N(0, 1) * noise_var`` on the real tokens of the word-embedding output (mt-dnn scales
    the standard normal by ``noise_var``); each of the ``steps`` ascent steps takes the gradient ``g`` of
    ``stable_kl(f(x + delta), f(x).detach())`` with respect to ``delta`` only (:meth:`AttackStep.input_gradient`:
    no ``.grad`` touched) and sets ``delta = normalise(delta + step_size * g)``, per token over the hidden size
    (``"inf"``: by the max-abs, ``"l2"``: by the L2 norm, plus ``epsilon``; ``"l1"``: the sign). A non-finite
    gradient adds nothing (counted as skipped). The regulariser is mt-dnn's ``SymKlCriterion`` (the squared error
    for a regression head). Unlike mt-dnn's ``fwd_type=2`` path, which adds the position and type embeddings a
    second time, ``delta`` is added to the word-embedding output once. Cost: about 2 passes with ``steps=1``.

    Causal LM: when the step returns ``{"loss", "logits", "labels"}`` with logits ``[B, T, V]`` and token labels
    ``[B, T]`` (-100 where masked), the ascent's ``stable_kl`` and the regulariser are taken per token over the
    positions that predict a label (:func:`~lightning_adv.core.smoothness.token_mask`: the logits at ``t``
    predict ``labels[:, t + 1]``), the regulariser averaged over those tokens of the batch.

    Args:
        model: the model (its input embedding found as :class:`~lightning_adv.core.EmbeddingOutput` says).
        adv_alpha: weight of the regulariser (>= 0); 0 adds nothing.
        step_size: ascent step (>= 0).
        noise_var: scale of the initial noise (>= 0).
        epsilon: guard of the normalisation (>= 0).
        steps: ascent steps (>= 1).
        norm: ``"inf"``, ``"l2"`` or ``"l1"``.
        embedding: dotted path of the input-embedding module; ``None`` finds it.
        generator: the random generator of the initial noise (default: the global one).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import SMART, adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> def loss_fn():
        ...     logits = model(x)
        ...     return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}
        >>> (outcome,) = adversarial_backward(model, [SMART(model, embedding="0")], loss_fn)
        >>> bool(outcome.loss > 0), bool(outcome.skipped)
        (True, False)
    """

    name = "smart"

    def __init__(
        self,
        model: nn.Module,
        adv_alpha: float = 1.0,
        step_size: float = 1e-3,
        noise_var: float = 1e-5,
        epsilon: float = 1e-6,
        steps: int = 1,
        norm: Literal["inf", "l2", "l1"] = "inf",
        embedding: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.check_arguments(type(self).__name__, adv_alpha, step_size, noise_var, epsilon, steps, norm, embedding)
        super().__init__(model, embedding, generator)
        self.weight, self.step_size, self.noise_var = float(adv_alpha), float(step_size), float(noise_var)
        self.epsilon, self.steps, self.norm = float(epsilon), int(steps), norm

    @staticmethod
    def check_arguments(
        owner: str, adv_alpha: float, step_size: float, noise_var: float, epsilon: float, steps: int, norm: str, embedding: Optional[str],
    ) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, adv_alpha=adv_alpha, step_size=step_size, noise_var=noise_var, epsilon=epsilon)
        check_int(owner, "steps", steps, 1, "the number of ascent steps")
        check_choice(owner, "norm", norm, ("inf", "l2", "l1"))
        check_module_path(owner, "embedding", embedding)

    def enabled(self) -> bool:
        return self.weight != 0

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """mt-dnn's per-token normalisation of ``delta + step_size * g``."""
        if self.norm == "l2":
            return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + self.epsilon)
        if self.norm == "l1":
            return x.sign()
        return x / (x.abs().amax(-1, keepdim=True) + self.epsilon)

    def perturbed_logits(self, step: AttackStep, clean: PassOutput) -> Tuple[torch.Tensor, torch.Tensor]:
        target_logits = clean.logits.detach()
        regression = is_regression(target_logits)
        mask = token_mask(target_logits, clean.labels)  # a causal LM: the ascent on the labelled tokens only
        valid = torch.ones((), dtype=torch.bool, device=target_logits.device)
        delta: Optional[torch.Tensor] = None

        def initial(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            noise = torch.empty_like(output).normal_(0.0, 1.0, generator=self.generator) * self.noise_var
            return (noise * mask.unsqueeze(-1).to(noise.dtype)).requires_grad_()

        make = initial
        for _ in range(self.steps):
            self.target.arm(make)
            out = step.extra_forward()
            delta = self.target.require_called()
            if out.logits is None:
                raise ValueError("SMART needs the logits of every pass: return {'loss': loss, 'logits': logits}.")
            if regression:
                adv = F.mse_loss(out.logits.float(), target_logits.float(), reduction="sum")  # as mt-dnn
            else:
                adv = stable_kl(select_tokens(out.logits, mask), select_tokens(target_logits, mask), reduce=False)
            grad = step.input_gradient(adv, delta)
            if grad is None:
                raise RuntimeError(
                    f"SMART: the logits do not depend on the output of the embedding module {self.target.path!r} (it ran "
                    "under torch.no_grad(), or its output was detached), so the perturbation gets no gradient. Compute "
                    "the embedding with gradients enabled (a frozen embedding is fine: requires_grad=False on its "
                    "weight, not torch.no_grad()), or pass embedding= naming the module that embeds the tokens."
                )
            finite = torch.isfinite(grad).all()
            valid = valid & finite
            with torch.no_grad():
                moved = self.normalise(delta + torch.nan_to_num(grad) * self.step_size).requires_grad_()
            make = lambda output, mask, d=moved: d  # noqa: E731
        self.target.arm(make)
        out = step.extra_forward()
        if out.logits is None:
            raise ValueError("SMART needs the logits of every pass: return {'loss': loss, 'logits': logits}.")
        return out.logits, valid

    def divergence(self, clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        if is_regression(clean):
            return F.mse_loss(clean.squeeze(-1), perturbed.squeeze(-1))
        return sym_kl_criterion(clean, perturbed)
