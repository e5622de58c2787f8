"""R-Drop (Liang et al., NeurIPS 2021): two forwards with two dropout masks, their losses averaged and their output
distributions pulled together by a symmetric KL (dropreg/R-Drop)."""

from __future__ import annotations

from typing import FrozenSet, List, Literal, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lightning_adv.core.checks import check_choice, check_non_negative
from lightning_adv.core.method import Method
from lightning_adv.core.smoothness import token_mask, wide
from lightning_adv.core.step import AttackStep, Outcome, PassOutput

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def rdrop_kl(p: torch.Tensor, q: torch.Tensor, reduction: str = "sum", pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """R-Drop's ``compute_kl_loss``: ``(KL(q || p) + KL(p || q)) / 2`` between the softmax of two logits, with
    gradients through both, summed over every element (``"sum"``, the source's) or then divided by the batch size
    (``"batchmean"``), in float32 (or wider). ``pad_mask`` (the source's, for sequence tasks): True at the positions
    ``[B, T]`` of token logits ``[B, T, V]`` left out of the sum."""
    t = wide(p.dtype)
    p_loss = F.kl_div(F.log_softmax(p, dim=-1, dtype=t), F.softmax(q, dim=-1, dtype=t), reduction="none")
    q_loss = F.kl_div(F.log_softmax(q, dim=-1, dtype=t), F.softmax(p, dim=-1, dtype=t), reduction="none")
    if pad_mask is not None:
        p_loss = p_loss.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        q_loss = q_loss.masked_fill(pad_mask.unsqueeze(-1), 0.0)
    loss = (p_loss.sum() + q_loss.sum()) / 2
    return loss / p.size(0) if reduction == "batchmean" else loss


class RDrop(Method):
    """R-Drop: the loss becomes ``0.5 * (loss_1 + loss_2) + alpha * (KL(p_2 || p_1) + KL(p_1 || p_2)) / 2``.

    ``loss_1, p_1`` are the clean pass's (the loop's own forward, not repeated), ``loss_2, p_2`` those of one more
    forward of the same batch, which draws another dropout mask (dropreg/R-Drop ``compute_kl_loss``: ``reduction="sum"``
    sums the KL over every example and class, as the source does; ``"batchmean"`` divides it by the batch size).
    Causal LM: when the step returns ``{"loss", "logits", "labels"}`` with token logits ``[B, T, V]``, the KL is summed
    over the labelled positions only (the source's ``pad_mask``: position ``t`` counts when ``labels[:, t + 1] != -100``,
    as transformers shifts; padding and prompt left out).
    The gradient equals that of the source's loss: the clean loss's gradient is halved in the clean backward (a
    hook on the clean loss), the KL is differentiated on detached copies of the two logits, and the second pass's
    ``0.5 * loss_2`` plus its part of the KL is backpropagated through the second forward. The user's loss is averaged
    over the two passes whatever it is (cross-entropy, label smoothing, extra terms). Cost: one forward and the
    backward through it (as R3F).

    Dropout must be on: a model in eval mode (transformers' ``from_pretrained`` returns one, and Lightning keeps it)
    draws the same output twice and R-Drop is plain training; the callback warns at the start of training.

    Args:
        model: the model (its dropout modules are what the eval-mode check watches).
        alpha: weight of the KL (>= 0); 0 still averages the two losses (the source's ``alpha=0``).
        reduction: ``"sum"`` (the source's) or ``"batchmean"``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import RDrop, adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        >>> x, y = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
        >>> def loss_fn():
        ...     logits = model(x)
        ...     return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}
        >>> (outcome,) = adversarial_backward(model, [RDrop(model, alpha=1.0)], loss_fn)
        >>> bool(outcome.loss > 0), bool(outcome.skipped)
        (True, False)
    """

    name = "rdrop"
    combine = "extend_loss"
    needs_logits = True
    needs_clean_pass = True

    def __init__(self, model: nn.Module, alpha: float = 1.0, reduction: Literal["sum", "batchmean"] = "sum") -> None:
        self.check_arguments(type(self).__name__, alpha, reduction)
        super().__init__()
        self.model = model
        self.weight, self.reduction = float(alpha), reduction
        dropouts = [name for name, m in model.named_modules() if isinstance(m, _DROPOUT) and name]
        self.dropout_paths = dropouts
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []
        self._outcome: Optional[Outcome] = None
        self._joined = False
        self.stats = {}

    @staticmethod
    def check_arguments(owner: str, alpha: float, reduction: str) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, alpha=alpha)
        check_choice(owner, "reduction", reduction, ("sum", "batchmean"))

    def watched_modules(self) -> List[str]:
        """The modules that must train (the eval-mode check): the dropout modules, or the whole model if none."""
        return self.dropout_paths or [""]

    def describe(self) -> str:
        n = len(self.dropout_paths)
        return f"a second dropout mask ({n} dropout module{'s' * (n != 1)})"

    def perturbs(self) -> FrozenSet[int]:
        return frozenset({id(self.model)})

    def compose(self, others: Sequence[object]) -> None:
        clash = sorted({type(m).__name__ for m in others if getattr(m, "combine", None) == "extend_loss"
                        and hasattr(m, "divergence")})
        if clash:
            raise ValueError(
                f"RDrop with {' and '.join(clash)} is not supported: RDrop halves the clean loss's gradient (the loss is "
                f"averaged over its two passes), and {', '.join(clash)} scale their own term by the clean loss's "
                "gradient, so the result would depend on the order of the callbacks. Train with one of them, or "
                "combine R-Drop with FGM, PGD or FreeLB (they add their passes to the clean gradient)."
            )

    def prepare(self, step: AttackStep) -> None:
        self._outcome, self._joined = None, False

    def before_backward(self, step: AttackStep, clean: Optional[PassOutput]) -> None:
        if clean is None or clean.logits is None:
            raise ValueError(
                "RDrop needs the clean logits: return {'loss': loss, 'logits': logits} from training_step (or from the "
                "mixin's loss_fn)."
            )
        second = step.extra_forward()
        if second.logits is None:
            raise ValueError("RDrop needs the logits of every pass: return {'loss': loss, 'logits': logits}.")
        z1 = clean.logits.detach().to(wide(clean.logits.dtype)).requires_grad_()
        z2 = second.logits.detach().to(z1.dtype).reshape(z1.shape).requires_grad_()
        keep_tokens = token_mask(z1, clean.labels)  # a causal LM: the KL over the labelled positions
        pad_mask = None if keep_tokens is None else ~keep_tokens
        with torch.enable_grad():
            value = rdrop_kl(z1, z2, self.reduction, pad_mask)
            g1, g2 = torch.autograd.grad(self.weight * value, [z1, z2])
        finite = torch.isfinite(g1).all() & torch.isfinite(g2).all()
        keep = finite.to(z1.dtype)  # a non-finite KL gradient adds no KL (counted as skipped), without a sync
        g1, g2 = torch.nan_to_num(g1) * keep, torch.nan_to_num(g2) * keep
        scale: List[torch.Tensor] = []

        def capture(grad: torch.Tensor) -> torch.Tensor:  # d(root)/d(loss): 1/accumulation and the GradScaler's scale
            scale.append(grad)
            return grad * 0.5  # the clean loss counts half: 0.5 * (loss_1 + loss_2)

        def join(grad: torch.Tensor) -> torch.Tensor:
            self._joined = True
            factor = scale[-1] if scale else 1.0
            return grad + (g1 * factor).to(grad.dtype).reshape(grad.shape)

        self._hooks = [clean.loss.register_hook(capture), clean.logits.register_hook(join)]
        step.backward_with_clean(0.5 * second.loss + (second.logits.to(z1.dtype).reshape(z1.shape) * g2).sum())
        self.stats["second_loss"] = second.loss.detach()
        self._outcome = Outcome(value.detach().clamp_min(0), ~finite)

    def run(self, step: AttackStep) -> Outcome:
        if not self._joined:
            raise RuntimeError(
                "RDrop: the logits returned beside the loss are not on the loss's graph (the clean backward never "
                "reached them); return the logits the loss is computed from."
            )
        assert self._outcome is not None
        return self._outcome

    def finish(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


__all__ = ["RDrop", "rdrop_kl"]
