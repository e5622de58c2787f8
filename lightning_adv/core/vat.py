"""VAT in bert4torch's form (``bert4torch/callbacks.py`` ``VAT``, after mt-dnn ALUM): one ascent step on the KL
from Gaussian noise on the word-embedding output, then ``adv_alpha * symmetric KL`` added to the loss."""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from lightning_adv.core.checks import check_choice, check_module_path, check_non_negative
from lightning_adv.core.smoothness import SmoothnessMethod, wide
from lightning_adv.core.step import AttackStep, PassOutput


def vat_kl(inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """bert4torch's ``VAT.kl``: ``KL(softmax(targets) || softmax(inputs))``, in float32 (or wider)."""
    t = wide(inputs.dtype)
    return F.kl_div(F.log_softmax(inputs, dim=-1, dtype=t), F.softmax(targets, dim=-1, dtype=t), reduction=reduction)


class VAT(SmoothnessMethod):
    """Virtual adversarial training as bert4torch does it: ``loss + adv_alpha * (KL(p || p_adv) + KL(p_adv || p))``.

    ``r`` starts as ``N(0, 1) * noise_var`` (a standard deviation of ``noise_var``: bert4torch calls it the variance)
    on every token of the word-embedding output; one ascent step takes the gradient ``g`` of
    ``KL(p(x) || p(x + r))`` (``batchmean``, the clean logits detached) with respect to ``r`` only and sets
    ``r = project(r + adv_step_size * g)``, per token over the hidden size (``"l2"``: divided by its L2 norm plus
    ``noise_gamma``; ``"inf"``: by its max-abs plus ``noise_gamma``; ``"l1"``: the sign). The regulariser is
    ``adv_alpha * (KL(p || p_adv) + KL(p_adv || p))``, each KL summed over the batch and differentiating only its log
    side (bert4torch ``kl(adv_logits, logits.detach()) + kl(logits, adv_logits.detach())``), the perturbed embedding
    output detached from the embedding (``embed.detach() + r``). A non-finite ascent gradient adds nothing (counted
    as skipped), as bert4torch returns no loss. Cost: two forwards, one backward to ``r`` and the backward of the
    perturbed forward.

    Unlike :class:`~lightning_adv.core.SMART` (mt-dnn), whose ascent differentiates mt-dnn's ``stable_kl`` summed over
    the batch, whose regulariser is a batch mean, and whose perturbed branch also trains the embedding.

    Args:
        model: the model (its input embedding found as :class:`~lightning_adv.core.EmbeddingOutput` says).
        adv_alpha: weight of the regulariser (>= 0); 0 adds nothing.
        adv_step_size: ascent step (>= 0).
        noise_var: standard deviation of the initial noise (>= 0).
        noise_gamma: guard of the per-token normalisation (>= 0).
        norm_type: ``"l2"`` (bert4torch's default), ``"inf"`` or ``"l1"``.
        embedding: dotted path of the input-embedding module; ``None`` finds it.
        generator: the random generator of the initial noise (default: the global one).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import VAT, adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> def loss_fn():
        ...     logits = model(x)
        ...     return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}
        >>> (outcome,) = adversarial_backward(model, [VAT(model, embedding="0")], loss_fn)
        >>> bool(outcome.loss >= 0), bool(outcome.skipped)
        (True, False)
    """

    name = "vat"

    def __init__(
        self,
        model: nn.Module,
        adv_alpha: float = 1.0,
        adv_step_size: float = 1e-3,
        noise_var: float = 1e-5,
        noise_gamma: float = 1e-6,
        norm_type: Literal["l2", "inf", "l1"] = "l2",
        embedding: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.check_arguments(type(self).__name__, adv_alpha, adv_step_size, noise_var, noise_gamma, norm_type, embedding)
        super().__init__(model, embedding, generator)
        self.weight, self.adv_step_size, self.noise_var = float(adv_alpha), float(adv_step_size), float(noise_var)
        self.noise_gamma, self.norm_type = float(noise_gamma), norm_type

    @staticmethod
    def check_arguments(
        owner: str, adv_alpha: float, adv_step_size: float, noise_var: float, noise_gamma: float, norm_type: str,
        embedding: Optional[str],
    ) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, adv_alpha=adv_alpha, adv_step_size=adv_step_size, noise_var=noise_var, noise_gamma=noise_gamma)
        check_choice(owner, "norm_type", norm_type, ("l2", "inf", "l1"))
        check_module_path(owner, "embedding", embedding)

    def enabled(self) -> bool:
        return self.weight != 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """bert4torch's ``adv_project``: the per-token normalisation of ``r + adv_step_size * g``."""
        if self.norm_type == "l2":
            return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + self.noise_gamma)
        if self.norm_type == "l1":
            return x.sign()
        return x / (x.abs().amax(-1, keepdim=True) + self.noise_gamma)

    def perturbed_logits(self, step: AttackStep, clean: PassOutput) -> Tuple[torch.Tensor, torch.Tensor]:
        target = clean.logits.detach()

        def initial(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # every token, as bert4torch
            return (torch.empty_like(output).normal_(0.0, 1.0, generator=self.generator) * self.noise_var).requires_grad_()

        self.target.arm(initial, detach=True)
        out = step.extra_forward()
        noise = self.target.require_called()
        if out.logits is None:
            raise ValueError("VAT needs the logits of every pass: return {'loss': loss, 'logits': logits}.")
        grad = step.input_gradient(vat_kl(out.logits, target, "batchmean"), noise)
        if grad is None:
            raise RuntimeError(
                f"VAT: the logits do not depend on the output of the embedding module {self.target.path!r} (it ran under "
                "torch.no_grad()); compute the embedding with gradients enabled, or pass embedding= naming the module "
                "that embeds the tokens."
            )
        valid = torch.isfinite(torch.linalg.vector_norm(grad))
        with torch.no_grad():
            moved = self.project(noise + torch.nan_to_num(grad) * self.adv_step_size)
        self.target.arm(lambda output, mask, r=moved: r, detach=True)
        out = step.extra_forward()
        if out.logits is None:
            raise ValueError("VAT needs the logits of every pass: return {'loss': loss, 'logits': logits}.")
        return out.logits, valid

    def divergence(self, clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        return vat_kl(perturbed, clean.detach()) + vat_kl(clean, perturbed.detach())


__all__ = ["VAT", "vat_kl"]
