"""FreeLB (Zhu et al., ICLR 2020): ascent on a per-example perturbation of the embedding outputs, with the
gradients of every pass accumulated, in the form of ``freelb_train_step`` of zhuchen03/FreeLB (fairseq)."""

from __future__ import annotations

from typing import Dict, FrozenSet, Literal, Optional

import torch
from torch import nn

from lightning_adv.core.checks import check_choice, check_int, check_module_path, check_non_negative
from lightning_adv.core.embedding import EmbeddingOutput, lengths, per_example_norms
from lightning_adv.core.method import Method
from lightning_adv.core.step import AttackStep, Outcome, PassOutput


class FreeLB(Method):
    """FreeLB: ``1 + adv_steps`` passes, each loss weighted ``1 / (1 + adv_steps)``, their gradients accumulated.

    The first pass is the clean one, run at ``delta0`` (0 when ``adv_init_mag`` is 0; else, per example, uniform
    noise on the real tokens scaled to ``adv_init_mag / sqrt(length * hidden)`` for ``l2``, or uniform in
    ``±adv_init_mag`` for ``linf``, drawn from ``generator``). Before each of the ``adv_steps`` further passes, ``delta`` moves by
    ``adv_lr * g / ||g_i||`` (``g``: its gradient in the previous pass, normalised per example by its L2 or
    L-inf norm) and is projected back to ``adv_max_norm`` when that is > 0 (rescaled per example for ``l2``,
    clamped element-wise for ``linf``). The embeddings are recomputed in every pass.

    Composed with other methods, ``x + delta0`` is the micro-batch's clean input for all of them: every pass of
    another method (R3F's and SMART's perturbed forwards, FGM's, PGD's and AWP's passes) runs at ``delta0``, as a
    constant offset (no gradient flows into ``delta0`` from them), and their own perturbations are added on top.
    FreeLB's first ascent step follows the gradient of the clean objective at ``delta0``, R3F's or SMART's
    regulariser included (through the clean logits).

    Args:
        model: the model; the perturbed module is found as :func:`~lightning_adv.core.embedding.find_embedding` says.
        adv_lr: the ascent step size (>= 0); 0 disables the attack.
        adv_steps: the number of ascent passes after the clean one (>= 1).
        adv_init_mag: the magnitude of the random initial perturbation (>= 0).
        adv_max_norm: the bound of the perturbation (>= 0; 0: unbounded).
        norm_type: ``"l2"`` or ``"linf"``.
        embedding: dotted path of the input-embedding module; ``None`` finds it.
        generator: the random generator of ``delta0`` (default: the global one).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_adv.core import FreeLB, adversarial_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> freelb = FreeLB(model, adv_steps=2, embedding="0")
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> (outcome,) = adversarial_backward(model, [freelb], lambda: nn.functional.cross_entropy(model(x), y))
        >>> bool(outcome.skipped), freelb.target.calls   # the clean pass and two ascent passes
        (False, 3)
    """

    name = "freelb"
    needs_clean_pass = True

    def __init__(
        self,
        model: nn.Module,
        adv_lr: float = 0.1,
        adv_steps: int = 2,
        adv_init_mag: float = 0.6,
        adv_max_norm: float = 0.0,
        norm_type: Literal["l2", "linf"] = "l2",
        embedding: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.check_arguments(type(self).__name__, adv_lr, adv_steps, adv_init_mag, adv_max_norm, norm_type, embedding)
        self.model = model
        self.target = EmbeddingOutput(model, embedding, type(self).__name__)
        self.adv_lr, self.adv_steps = float(adv_lr), int(adv_steps)
        self.adv_init_mag, self.adv_max_norm, self.norm_type = float(adv_init_mag), float(adv_max_norm), norm_type
        self.clean_weight = 1.0 / (1 + self.adv_steps)
        self.generator = generator
        self._delta0: Optional[torch.Tensor] = None
        self.stats: Dict[str, torch.Tensor] = {}
        """What the last attack measured (0-d tensors on the device): ``delta_norm``, the mean over the examples
        of the L2 norm of each example's last perturbation (over its tokens and hidden size)."""

    @staticmethod
    def check_arguments(
        owner: str, adv_lr: float, adv_steps: int, adv_init_mag: float, adv_max_norm: float, norm_type: str, embedding: Optional[str],
    ) -> None:
        """Raise ``ValueError`` naming the first bad argument (shared with the callback, which checks at construction)."""
        check_non_negative(owner, adv_lr=adv_lr, adv_init_mag=adv_init_mag, adv_max_norm=adv_max_norm)
        check_int(owner, "adv_steps", adv_steps, 1, "the number of ascent passes after the clean one")
        check_choice(owner, "norm_type", norm_type, ("l2", "linf"))
        check_module_path(owner, "embedding", embedding)

    def enabled(self) -> bool:
        return self.adv_lr != 0 or self.adv_init_mag != 0

    def describe(self) -> str:
        return f"the output of {self.target.path or type(self.target.module).__name__}"

    def perturbs(self) -> FrozenSet[int]:
        return frozenset({id(self.target.module)})

    def initial(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``delta0`` for an embedding output ``[B, T, H]`` and its mask of real tokens."""
        if self.adv_init_mag == 0:
            return torch.zeros_like(output).requires_grad_()
        real = mask.unsqueeze(2).to(output.dtype)
        if self.norm_type == "l2":
            delta = torch.empty_like(output).uniform_(-1, 1, generator=self.generator) * real
            magnitude = self.adv_init_mag / torch.sqrt(lengths(mask).to(output.dtype) * output.shape[-1])
            delta = delta * magnitude.view(-1, 1, 1)
        else:
            delta = torch.empty_like(output).uniform_(-self.adv_init_mag, self.adv_init_mag, generator=self.generator) * real
        return delta.detach().requires_grad_()

    def _first(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._delta0 = self.initial(output, mask)
        return self._delta0

    def ascend(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One ascent step of ``delta`` from its gradient, projected; a new leaf."""
        with torch.no_grad():
            if self.norm_type == "l2":
                delta = delta + self.adv_lr * grad / per_example_norms(grad).clamp_min(1e-10)
                if self.adv_max_norm > 0:
                    norm = per_example_norms(delta.float()).to(delta.dtype)
                    outside = norm > self.adv_max_norm
                    delta = delta * torch.where(outside, self.adv_max_norm / torch.where(outside, norm, 1.0), 1.0)
            else:
                delta = delta + self.adv_lr * grad / per_example_norms(grad, float("inf")).clamp_min(1e-8)
                if self.adv_max_norm > 0:
                    delta = delta.clamp(-self.adv_max_norm, self.adv_max_norm)
        return delta.requires_grad_()

    def prepare(self, step: AttackStep) -> None:
        self._delta0 = None
        self.target.attach(first=True)  # the other methods' perturbations are added to delta0
        self.target.arm(self._first)

    def before_pass(self, step: AttackStep) -> None:
        """Another method's pass (or none armed): it runs at ``delta0``, a constant offset."""
        if self._delta0 is not None and not self.target.armed:
            self.target.arm(lambda output, mask, d=self._delta0.detach(): _same_shape(d, output))

    def run(self, step: AttackStep) -> Outcome:
        delta = self._delta0
        if delta is None:
            self.target.require_called()
        assert delta is not None
        if delta.grad is None:
            raise RuntimeError(
                f"FreeLB: the embedding module {self.target.path!r} got no gradient from the loss; the perturbation needs "
                "the model to embed its input ids with it, with gradients enabled (not under torch.no_grad() or "
                "detached). Pass embedding= naming the module that embeds the tokens."
            )
        grad = delta.grad
        finite = torch.isfinite(grad).all()
        out: Optional[PassOutput] = None
        for t in range(self.adv_steps):
            delta = self.ascend(delta.detach(), torch.nan_to_num(grad, 0.0, 0.0, 0.0))
            if t == self.adv_steps - 1:
                self.stats["delta_norm"] = per_example_norms(delta.detach().float()).mean()
            self.target.arm(lambda output, mask, d=delta: _same_shape(d, output))
            out = step.forward(final=t == self.adv_steps - 1)
            step.backward(out.loss * self.clean_weight)
            grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
        assert out is not None
        return Outcome(out.loss.detach(), ~finite)

    def finish(self) -> None:
        self.target.detach()
        self.target.delta = self.target.mask = self._delta0 = None


def _same_shape(delta: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if delta.shape != output.shape:
        raise RuntimeError(
            f"FreeLB: the embedding output changed shape between passes ({tuple(delta.shape)} -> {tuple(output.shape)}); "
            "the adversarial passes must see the batch of the clean pass."
        )
    return delta
