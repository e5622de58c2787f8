"""The per-example attack on the embedding output used to measure robustness (see :mod:`lightning_adv.core.robust`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Literal, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from lightning_adv.core.checks import check_int, check_non_negative
from lightning_adv.core.embedding import per_example_norms

from lightning_adv.core.robust_args import Epsilons, ForwardOutput, check_attack_args, epsilon_key, find_target


@dataclass
class AttackResult:
    """The outcome of :meth:`EmbeddingAttack.run` on one batch (all tensors detached, logits in float32, or float64 for a float64 model).

    Attributes:
        epsilons: the radii, in the order of :attr:`logits`.
        labels: the integer labels ``[B]``.
        clean_logits: the logits of the unperturbed batch ``[B, C]``.
        logits: the logits under attack ``[E, B, C]``, one row per epsilon.
        nonfinite: ``[E, B]``; True where an example's gradient was not finite at some step (taken as 0 there).
        alias: the attack was given one epsilon as a number (not a list): :meth:`per_example` adds ``robust_acc``.
    """

    epsilons: Tuple[float, ...]
    labels: torch.Tensor
    clean_logits: torch.Tensor
    logits: torch.Tensor
    nonfinite: torch.Tensor
    alias: bool = False

    def per_example(self) -> Dict[str, torch.Tensor]:
        """Per-example values ``[B]`` whose means are the metrics: ``clean_acc``, ``clean_loss``, and for each
        epsilon ``robust_acc@eps`` (1 where the attacked example is still classified correctly) and
        ``robust_loss_gain@eps`` (its adversarial minus its clean cross-entropy); ``robust_acc`` too for a
        single epsilon given as a number.

        Causal LM (logits ``[B, T, V]``, labels ``[B, T]``): per-token values ``[N]``, one per position that
        predicts a label (the logits at ``t`` predict ``labels[:, t + 1]``; -100 is masked), so that their means
        are the token accuracy and the mean token cross-entropy over the labelled tokens."""
        labels, clean_logits, attacked = self.labels, self.clean_logits, self.logits
        if labels.dim() == 2:  # a causal LM: the labelled positions, shifted as transformers does
            mask = labels[:, 1:] != IGNORE_INDEX
            labels = labels[:, 1:][mask]
            clean_logits = clean_logits[:, :-1][mask]
            attacked = attacked[:, :, :-1][:, mask]
        clean_loss = F.cross_entropy(clean_logits, labels, reduction="none")
        out = {
            "clean_acc": (clean_logits.argmax(-1) == labels).float(),
            "clean_loss": clean_loss,
        }
        for i, eps in enumerate(self.epsilons):
            key = epsilon_key(eps)
            logits = attacked[i]
            out[f"robust_acc@{key}"] = (logits.argmax(-1) == labels).float()
            out[f"robust_loss_gain@{key}"] = F.cross_entropy(logits, labels, reduction="none") - clean_loss
        if self.alias:
            out["robust_acc"] = out[f"robust_acc@{epsilon_key(self.epsilons[0])}"]
        return out


class EmbeddingAttack:
    """A per-example attack on the output of the input-embedding module: fast gradient (``steps=1``) or PGD.

    For each example ``i`` of a batch, with ``g_i`` the gradient of its cross-entropy with respect to its
    embedding output (0 on padding positions):

    - ``steps=1`` (fast gradient): ``delta_i = epsilon * g_i / ||g_i||_2`` (``"l2"``, the norm over the example's
      ``T * H`` values) or ``epsilon * sign(g_i)`` (``"linf"``);
    - ``steps>1`` (PGD): ``steps`` moves of ``step_size`` along ``g_i / ||g_i||_2`` or ``sign(g_i)``, each followed
      by the projection onto the ball of radius ``epsilon`` (per example rescaling for l2, clamping for linf);
      the logits are those at the last iterate.

    With ``random_start`` the attack starts at a random point of the ball (l2: a Gaussian direction and a radius
    uniform in ``[0, epsilon]``; linf: uniform in ``[-epsilon, epsilon]``), drawn from a ``torch.Generator``
    seeded with ``seed`` (:meth:`reset` re-seeds it): a rerun on the same batches in the same order gives the same
    numbers. These draws are the one thing that depends on how the examples are batched; without random start,
    an example's result depends on nothing but the example.

    Several epsilons share the clean forward and its gradient; each adds ``steps`` forwards (``steps - 1`` of
    them with a backward to ``delta``). An epsilon of 0 costs nothing and gives the clean logits.

    The model is used as it is: put it in eval mode for an evaluation. Batches of inference tensors (made under
    ``torch.inference_mode()``) must be cloned outside inference mode first.

    Args:
        model: the model; it must embed its input ids with the perturbed module.
        epsilon: the radius of the ball (>= 0), or a list of radii attacked separately.
        norm_type: ``"l2"`` or ``"linf"``.
        steps: 1 for the fast-gradient attack, more for PGD (>= 1).
        step_size: the PGD step (>= 0); None: ``2.5 * epsilon / steps`` (``epsilon`` for ``steps=1``).
        random_start: start from a random point of the ball instead of 0.
        embedding: dotted path of the input-embedding module; None: ``get_input_embeddings()`` of the first
            submodule that has it, else the model's only ``nn.Embedding``.
        seed: the seed of the random start.
        owner: the name that error messages give the attack (a callback passes its own).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2)).eval()
        >>> attack = EmbeddingAttack(model, epsilon=[0.0, 1.0], embedding="0")
        >>> x, y = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 0, 1])
        >>> result = attack.run(lambda: model(x), y)
        >>> result.logits.shape                               # [epsilons, batch, classes]
        torch.Size([2, 4, 2])
        >>> torch.equal(result.logits[0], result.clean_logits)    # epsilon 0: the clean logits
        True
        >>> bool((result.per_example()["robust_loss_gain@1"] > 0).all())   # the attack raises every loss
        True
        >>> attack.perturbed_logits(lambda: model(x), y, epsilon=1.0).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: Epsilons = 1.0,
        norm_type: Literal["l2", "linf"] = "l2",
        steps: int = 1,
        step_size: Optional[float] = None,
        random_start: bool = False,
        embedding: Optional[str] = None,
        seed: int = 0,
        owner: Optional[str] = None,
    ) -> None:
        owner = owner or type(self).__name__
        self.epsilons = check_attack_args(owner, epsilon, norm_type, steps, step_size, random_start, seed)
        self.alias = not isinstance(epsilon, (list, tuple))
        self.model = model
        self.norm_type, self.steps, self.step_size = norm_type, int(steps), step_size
        self.random_start, self.seed = random_start, int(seed)
        self.owner = owner
        self.target = find_target(model, embedding, owner)
        self._generators: Dict[torch.device, torch.Generator] = {}

    def reset(self, seed: Optional[int] = None) -> None:
        """Re-seed the random start (with ``seed``, or the seed given at construction)."""
        if seed is not None:
            check_int(self.owner, "seed", seed, 0, "the seed of the random start")
            self.seed = int(seed)
        self._generators.clear()

    def step_of(self, epsilon: float) -> float:
        """The PGD step for ``epsilon``."""
        if self.step_size is not None:
            return float(self.step_size)
        return epsilon if self.steps == 1 else 2.5 * epsilon / self.steps

    # -- one batch ------------------------------------------------------------------------------------------
    def perturbed_logits(
        self, forward_fn: Callable[[], ForwardOutput], labels: Optional[torch.Tensor] = None, epsilon: Optional[float] = None
    ) -> torch.Tensor:
        """The logits ``[B, C]`` under attack at ``epsilon`` (default: the attack's only epsilon).

        ``forward_fn()`` computes the logits of the batch (or ``(logits, labels)``; then ``labels`` may be None).
        """
        if epsilon is None:
            if len(self.epsilons) != 1:
                raise ValueError(f"{self.owner}.perturbed_logits: pass epsilon= (one of {list(self.epsilons)}).")
            return self.run(forward_fn, labels).logits[0]
        check_non_negative(f"{self.owner}.perturbed_logits", epsilon=epsilon)
        return self._run(forward_fn, labels, (float(epsilon),), alias=False).logits[0]

    def run(self, forward_fn: Callable[[], ForwardOutput], labels: Optional[torch.Tensor] = None) -> AttackResult:
        """Attack one batch at every epsilon.

        Args:
            forward_fn: computes the logits ``[B, C]`` of the batch, or ``(logits, labels)``; called once for the
                clean logits and once per attack pass, each time embedding the same inputs.
            labels: the integer labels ``[B]``; None when ``forward_fn`` returns them.
        """
        return self._run(forward_fn, labels, self.epsilons, self.alias)

    def _run(
        self, forward_fn: Callable[[], ForwardOutput], labels: Optional[torch.Tensor], epsilons: Tuple[float, ...], alias: bool
    ) -> AttackResult:
        target = self.target
        with torch.inference_mode(False), torch.enable_grad():
            target.attach()
            try:
                return self._attack(forward_fn, labels, epsilons, alias)
            except RuntimeError as err:
                if "nference tensor" in str(err):
                    raise RuntimeError(
                        f"{self.owner}: {err}\nThe batch (or a buffer of the model) was made under torch.inference_mode(): "
                        "clone its tensors outside inference mode before the attack, or use Trainer(inference_mode=False)."
                    ) from err
                raise
            finally:
                target.detach()
                target.delta = target.mask = None

    def _forward(self, forward_fn: Callable[[], ForwardOutput], labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        out = forward_fn()
        if isinstance(out, (tuple, list)) and len(out) == 2:
            logits, found = out
            labels = found if labels is None else labels
        elif isinstance(out, torch.Tensor):
            logits = out
        else:
            raise TypeError(f"{self.owner}: the forward must return logits [B, C] or (logits, labels), got {type(out).__name__}.")
        if labels is None:
            raise ValueError(f"{self.owner}: no labels: pass labels= or make the forward return (logits, labels).")
        token_level = logits.dim() == 3 and labels.shape == logits.shape[:2]  # a causal LM
        if not token_level and (logits.dim() != 2 or labels.shape != logits.shape[:1]):
            raise ValueError(
                f"{self.owner}: expected logits [batch, classes] and labels [batch] (or a causal LM's logits [batch, "
                f"tokens, vocab] and labels [batch, tokens]), got {tuple(logits.shape)} and {tuple(labels.shape)}."
            )
        return logits, labels

    def _armed(self, delta: Optional[torch.Tensor]) -> None:
        """Perturb the next call of the embedding module with ``delta`` (zeros needing a gradient when None)."""

        def make(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if delta is None:
                return torch.zeros(output.shape, dtype=_work_dtype(output), device=output.device, requires_grad=True)
            if delta.shape != output.shape:
                raise RuntimeError(
                    f"{self.owner}: the embedding output changed shape between passes ({tuple(delta.shape)} -> "
                    f"{tuple(output.shape)}); every pass of the forward must embed the same batch."
                )
            return delta

        self.target.arm(make)

    def _delta(self) -> Tuple[torch.Tensor, torch.Tensor]:
        delta, mask = self.target.delta, self.target.mask
        if delta is None or mask is None:
            raise RuntimeError(
                f"{self.owner}: the embedding module {self.target.path or type(self.target.module).__name__!r} was not "
                "called by the forward; the attack needs the model to embed its input ids with it. Pass embedding= "
                "naming the module that embeds the tokens."
            )
        return delta, mask

    def _grad(self, loss: torch.Tensor, delta: torch.Tensor, real: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gradient of ``loss`` w.r.t. ``delta`` on the real tokens (non-finite values as 0), and the examples
        where it was not finite."""
        (grad,) = torch.autograd.grad(loss, [delta], allow_unused=True)
        if grad is None:
            raise RuntimeError(f"{self.owner}: the loss does not depend on the output of the embedding module {self.target.path!r}.")
        grad = grad * real
        nonfinite = ~torch.isfinite(grad).flatten(1).all(1)
        return torch.nan_to_num(grad, 0.0, 0.0, 0.0), nonfinite

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm_type == "l2":
            return grad / per_example_norms(grad).clamp_min(torch.finfo(grad.dtype).tiny)
        return grad.sign()

    def _project(self, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
        if self.norm_type == "l2":
            norm = per_example_norms(delta)
            return delta * torch.where(norm > epsilon, epsilon / norm.clamp_min(torch.finfo(delta.dtype).tiny), 1.0)
        return delta.clamp(-epsilon, epsilon)

    def _random(self, like: torch.Tensor, real: torch.Tensor, epsilon: float) -> torch.Tensor:
        generator = self._generators.get(like.device)
        if generator is None:
            generator = self._generators[like.device] = torch.Generator(device=like.device)
            generator.manual_seed(self.seed)
        if self.norm_type == "l2":
            noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype) * real
            radius = torch.rand((like.shape[0], 1, 1), generator=generator, device=like.device, dtype=like.dtype) * epsilon
            return noise / per_example_norms(noise).clamp_min(torch.finfo(like.dtype).tiny) * radius
        noise = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (noise * 2 - 1) * epsilon * real

    def _attack(
        self, forward_fn: Callable[[], ForwardOutput], labels: Optional[torch.Tensor], epsilons: Tuple[float, ...], alias: bool
    ) -> AttackResult:
        need_grad = not self.random_start and any(e > 0 for e in epsilons)  # the first step starts from 0
        self._armed(None)
        with torch.set_grad_enabled(need_grad):
            logits, labels = self._forward(forward_fn, labels)
        labels = labels.detach()
        zero, mask = self._delta()
        real = mask.unsqueeze(-1).to(zero.dtype)
        clean_logits = _wide(logits.detach())
        clean_grad: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if need_grad:
            loss = _summed_loss(_wide(logits), labels)  # each example's gradient is its own
            clean_grad = self._grad(loss, zero, real)
        del logits
        rows, bad = [], []
        for epsilon in epsilons:
            if epsilon == 0:
                rows.append(clean_logits)
                bad.append(torch.zeros(labels.shape[:1], dtype=torch.bool, device=labels.device))
                continue
            alpha = self.step_of(epsilon)
            delta = self._random(zero, real, epsilon) if self.random_start else torch.zeros_like(zero)
            nonfinite = torch.zeros(labels.shape[:1], dtype=torch.bool, device=labels.device)
            for t in range(self.steps):
                if t == 0 and clean_grad is not None:
                    grad, bad_t = clean_grad
                else:
                    delta = delta.detach().requires_grad_()
                    self._armed(delta)
                    step_logits, _ = self._forward(forward_fn, labels)
                    grad, bad_t = self._grad(_summed_loss(_wide(step_logits), labels), delta, real)
                nonfinite = nonfinite | bad_t
                with torch.no_grad():
                    delta = self._project(delta.detach() + alpha * self._direction(grad), epsilon) * real
            with torch.no_grad():
                self._armed(delta)
                adv_logits, _ = self._forward(forward_fn, labels)
            rows.append(_wide(adv_logits.detach()))
            bad.append(nonfinite)
        return AttackResult(epsilons, labels, clean_logits, torch.stack(rows), torch.stack(bad), alias)


IGNORE_INDEX = -100


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy summed over the examples (the gradient of each example is its own); for a causal LM
    (logits ``[B, T, V]``, labels ``[B, T]``), summed over the labelled tokens, shifted as transformers does (the
    logits at ``t`` predict ``labels[:, t + 1]``; -100 ignored)."""
    if logits.dim() == 3:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def _work_dtype(output: torch.Tensor) -> torch.dtype:
    """float32 for a half-precision output, its own dtype when wider."""
    return torch.promote_types(output.dtype, torch.float32) if output.is_floating_point() else torch.float32


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 (float64 stays float64)."""
    return logits.to(_work_dtype(logits))
