"""The smoothness regularisers (SMART, R3F): a divergence between the clean logits and the logits at a
perturbed embedding output, added to the clean loss.

Adding it costs no extra backward through the clean forward: the divergence is differentiated on detached
copies of the two logits (a few numbers per example); its gradient with respect to the perturbed logits is
backpropagated through the perturbed forward at once (under FSDP, with the clean loss in its backward:
:meth:`AttackStep.backward_with_clean`), and the one with respect to the clean logits joins the clean backward
through a hook on the clean logits, scaled as the clean loss is (accumulation, GradScaler). The result equals the
backward of ``loss + weight * divergence``.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from lightning_adv.core.embedding import EmbeddingOutput, per_example_norms
from lightning_adv.core.method import Method
from lightning_adv.core.step import AttackStep, Outcome, PassOutput


def wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the logits' own dtype when wider (float64): the divergences never run in half precision."""
    return torch.promote_types(dtype, torch.float32)


def symmetric_kl(noised: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """R3F's ``KL(p_clean || p_noised) + KL(p_noised || p_clean)``, summed over classes, mean over the batch,
    in float32 (or wider), with gradients through both logits (fairseq ``sentence_prediction_r3f``)."""
    t = wide(noised.dtype)
    return (
        F.kl_div(F.log_softmax(noised, dim=-1, dtype=t), F.softmax(clean, dim=-1, dtype=t), None, None, "sum")
        + F.kl_div(F.log_softmax(clean, dim=-1, dtype=t), F.softmax(noised, dim=-1, dtype=t), None, None, "sum")
    ) / noised.size(0)


def stable_kl(logit: torch.Tensor, target: torch.Tensor, epsilon: float = 1e-6, reduce: bool = True) -> torch.Tensor:
    """SMART's numerically stable KL used for the ascent (mt-dnn ``loss.stable_kl``), in float32 (or wider)."""
    logit = logit.reshape(-1, logit.size(-1)).to(wide(logit.dtype))
    target = target.reshape(-1, target.size(-1)).to(wide(target.dtype))
    p = F.log_softmax(logit, 1).exp()
    y = F.log_softmax(target, 1).exp()
    rp = -(1.0 / (p + epsilon) - 1 + epsilon).detach().log()
    ry = -(1.0 / (y + epsilon) - 1 + epsilon).detach().log()
    total = (p * (rp - ry) * 2).sum()
    return total / logit.size(0) if reduce else total


def sym_kl_criterion(clean: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    """SMART's final regulariser (mt-dnn ``SymKlCriterion(clean, adversarial)``): each KL term differentiates
    only the logits on its log side, batch mean, float32 (or wider)."""
    t = wide(clean.dtype)
    return F.kl_div(
        F.log_softmax(clean, dim=-1, dtype=t), F.softmax(adversarial.detach(), dim=-1, dtype=t), reduction="batchmean"
    ) + F.kl_div(F.log_softmax(adversarial, dim=-1, dtype=t), F.softmax(clean.detach(), dim=-1, dtype=t), reduction="batchmean")


IGNORE_INDEX = -100
"""The label of a position that the loss ignores (``torch.nn.CrossEntropyLoss`` and transformers)."""


def token_mask(logits: torch.Tensor, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The positions of causal-LM logits ``[B, T, V]`` that predict a label, ``[B, T]`` bool; ``None`` for any
    other output (sequence-classification logits ``[B, C]``, or no labels given).

    As transformers' causal-LM loss shifts: the logits at position ``t`` predict ``labels[:, t + 1]``, so position
    ``t`` counts when ``labels[:, t + 1] != -100``, and the last position never does. Padding (left or right) and
    prompt tokens labelled -100 are thus left out, whatever side the padding is on.

    >>> token_mask(torch.zeros(1, 4, 5), torch.tensor([[-100, 7, 8, -100]])).tolist()
    [[True, True, False, False]]
    """
    if labels is None or logits.dim() != 3 or labels.shape != logits.shape[:2]:
        return None
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask.to(logits.device)


def select_tokens(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The logits of the positions of ``mask``, ``[N, V]`` (all of ``logits`` when ``mask`` is None): a divergence
    of them with a mean over the rows is the mean over the labelled tokens of the batch."""
    return logits if mask is None else logits[mask]


def is_regression(logits: torch.Tensor) -> bool:
    """One output per example: a regression head, for which the squared error replaces the KL."""
    return logits.dim() == 1 or logits.shape[-1] == 1


class SmoothnessMethod(Method):
    """Base of SMART and R3F: perturb the embedding output, run the forward, add ``weight * divergence(clean,
    perturbed logits)`` to the clean loss. A subclass implements :meth:`perturbed_logits` and :meth:`divergence`."""

    combine = "extend_loss"
    needs_logits = True
    needs_clean_pass = True
    weight: float = 1.0

    def __init__(self, model: nn.Module, embedding: Optional[str], generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.model = model
        self.target = EmbeddingOutput(model, embedding, type(self).__name__)
        self.generator = generator
        self._outcome: Optional[Outcome] = None
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []
        self._joined = False
        self.stats: Dict[str, torch.Tensor] = {}
        """What the last attack measured (0-d tensors on the device): ``delta_norm``, the mean over the examples
        of the L2 norm of each example's perturbation of the embedding output (over its tokens and hidden size)."""

    def describe(self) -> str:
        return f"the output of {self.target.path or type(self.target.module).__name__}"

    def perturbs(self) -> FrozenSet[int]:
        return frozenset({id(self.target.module)})

    def perturbed_logits(self, step: AttackStep, clean: PassOutput) -> Tuple[torch.Tensor, torch.Tensor]:
        """The logits at the perturbed embedding output (with their graph) and a 0-d bool: the attack is valid."""
        raise NotImplementedError

    def divergence(self, clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """The regulariser between the two logits (float32 copies that require grad)."""
        raise NotImplementedError

    def prepare(self, step: AttackStep) -> None:
        self.target.attach()
        self._outcome, self._joined = None, False

    def before_backward(self, step: AttackStep, clean: Optional[PassOutput]) -> None:
        if clean is None or clean.logits is None:
            raise ValueError(
                f"{type(self).__name__} needs the clean logits: return {{'loss': loss, 'logits': logits}} from "
                "training_step (or from the mixin's loss_fn)."
            )
        perturbed, valid = self.perturbed_logits(step, clean)
        if self.target.delta is not None:
            self.stats["delta_norm"] = per_example_norms(self.target.delta.detach().float()).mean()
        z_clean = clean.logits.detach().to(wide(clean.logits.dtype)).requires_grad_()
        z_perturbed = perturbed.detach().to(z_clean.dtype).reshape(z_clean.shape).requires_grad_()
        mask = token_mask(z_clean, clean.labels)  # a causal LM: the divergence per token, over the labelled ones
        with torch.enable_grad():
            value = self.divergence(select_tokens(z_clean, mask), select_tokens(z_perturbed, mask))
            if mask is not None:
                value = torch.where(mask.any(), value, torch.zeros_like(value))  # no labelled token: nothing
            g_clean, g_perturbed = torch.autograd.grad(self.weight * value, [z_clean, z_perturbed], allow_unused=True)
        keep = valid.to(z_clean.dtype)  # an invalid attack (non-finite gradient) adds nothing, without a sync
        g_clean = torch.zeros_like(z_clean) if g_clean is None else torch.nan_to_num(g_clean) * keep
        g_perturbed = torch.zeros_like(z_clean) if g_perturbed is None else torch.nan_to_num(g_perturbed) * keep
        scale: List[torch.Tensor] = []

        def capture(grad: torch.Tensor) -> None:  # d(root)/d(loss): 1/accumulation and the GradScaler's scale
            scale.append(grad)

        def join(grad: torch.Tensor) -> torch.Tensor:
            self._joined = True
            factor = scale[-1] if scale else 1.0
            return grad + (g_clean * factor).to(grad.dtype).reshape(grad.shape)

        self._hooks = [clean.loss.register_hook(capture), clean.logits.register_hook(join)]
        step.backward_with_clean((perturbed.to(z_clean.dtype).reshape(z_clean.shape) * g_perturbed).sum())
        # a divergence is >= 0, but its float32 sum over two nearly equal distributions can round to -1e-8: the value
        # reported (logged) is clamped at 0; the gradient above is the exact one
        self._outcome = Outcome(value.detach().clamp_min(0), ~valid)

    def run(self, step: AttackStep) -> Outcome:
        if not self._joined:
            raise RuntimeError(
                f"{type(self).__name__}: the logits returned beside the loss are not on the loss's graph (the clean "
                "backward never reached them); return the logits the loss is computed from."
            )
        assert self._outcome is not None
        return self._outcome

    def finish(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.target.detach()
        self.target.delta = self.target.mask = None
