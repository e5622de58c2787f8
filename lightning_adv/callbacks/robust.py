"""RobustAccuracy: accuracy under a per-example attack on the embedding outputs, at validation and test time."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_adv.callbacks import compat, progress
from lightning_adv.core.checks import NonNegativeFloat, NonNegativeInt, PositiveInt, check_int, check_module_path
from lightning_adv.core.robust import EmbeddingAttack, check_attack_args, epsilon_key

PROTOCOL = "robust_forward"

_PREFIX = {"validate": "val", "test": "test"}


class RobustAccuracy(Callback):
    """Accuracy of the model when each example is attacked alone, around the output of its input-embedding module.

    For every validation/test batch the callback runs :class:`~lightning_adv.core.robust.EmbeddingAttack`: each
    example gets its own perturbation ``delta`` of the embedding output, 0 on padding, in the ball of radius
    ``epsilon`` around it (L2 norm over the example's tokens, or L-inf). ``steps=1`` is the fast-gradient attack
    (``epsilon * g_i / ||g_i||`` or ``epsilon * sign(g_i)``), ``steps>1`` PGD. The loss attacked is the sum of
    the per-example cross-entropies, so an example's result does not depend on the batch size or the order of
    the evaluation data. Only the perturbation gets a gradient (``torch.autograd.grad``): the parameters' ``.grad``
    and the weights are untouched, and frozen, tied and PEFT embeddings work. The attack's arithmetic runs in
    float32, inside the precision plugin's forward context for the forwards, without host synchronisation.

    Logged at epoch level, one key per value, per epsilon (``@`` and the epsilon: ``@0.5``, ``@1``, also when
    ``epsilon`` is a single number), with Lightning's ``/dataloader_idx_N`` suffix when there are several
    dataloaders, and synchronised across processes (torchmetrics ``MeanMetric``):

    - ``val_robust_acc@<eps>`` / ``test_robust_acc@<eps>``: the accuracy under attack;
    - ``val_robust_loss_gain@<eps>`` / ``test_robust_loss_gain@<eps>``: mean adversarial minus mean clean
      cross-entropy.

    The progress bar shows one of them, the robust accuracy at one epsilon (``prog_bar``), under a short name:
    ``val_rob@<eps>`` / ``test_rob@<eps>`` (the loggers and ``callback_metrics`` keep the full name).

    The model is evaluated in the mode Lightning sets (eval). Nothing runs during the sanity check.

    **Protocol.** The LightningModule must define ``robust_forward(batch) -> (logits, labels)``: the logits
    ``[batch, num_classes]`` of a batch as the evaluation dataloader yields it, and the integer labels. It must
    embed the input ids with the perturbed module (found as ``embedding`` says).

    **Causal LM.** ``robust_forward`` may return a causal LM's logits ``[batch, tokens, vocab]`` and its token labels
    ``[batch, tokens]`` (-100 on padding and prompt; padding left or right), with ``num_classes`` the vocabulary
    size. Everything is then per token, over the positions that predict a label (the logits at ``t`` predict
    ``labels[:, t + 1]``, as transformers shifts): the attacked loss is the token cross-entropy summed over those
    positions (each example's gradient its own), and ``robust_acc`` is the fraction of all labelled tokens of the
    evaluation data whose argmax is still the label (``robust_loss_gain``: the mean over those tokens).

    Args:
        epsilon: L2 norm of the perturbation of each example's embedding output (its largest element for
            linf), >= 0; or a list of them, each measured separately. 0 gives the clean accuracy.
        norm_type: "l2" or "linf".
        steps: 1: the fast-gradient attack; more: PGD with that many steps.
        step_size: the PGD step (>= 0); None: 2.5 * epsilon / steps.
        random_start: start the attack at a random point of the ball (re-seeded with seed at every evaluation epoch).
        num_classes: number of classes of the logits (>= 2).
        embedding: dotted path of the input-embedding module in the LightningModule; None: the
            get_input_embeddings() of its first transformers model, else its only nn.Embedding.
        seed: the seed of the random start (>= 0).
        validate: measure during validation (val_*), including the validation of fit.
        test: measure during test (test_*).
        prog_bar: which robust accuracy the progress bar shows: True, that of the first epsilon; a number, that
            of this epsilon (one of epsilon); False, none.

    Example::

        >>> import torch, lightning as L
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Tiny(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.word_embeddings = torch.nn.Embedding(10, 4)
        ...         self.head = torch.nn.Linear(4, 2)
        ...     def robust_forward(self, batch):
        ...         ids, labels = batch
        ...         return self.head(self.word_embeddings(ids).mean(1)), labels
        ...     def test_step(self, batch, batch_idx):
        ...         pass
        >>> data = DataLoader(TensorDataset(torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,))), batch_size=4)
        >>> robust = RobustAccuracy(epsilon=[0.5, 2.0])
        >>> trainer = L.Trainer(callbacks=[robust], logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> metrics = trainer.test(Tiny(), data, verbose=False)[0]
        >>> sorted(metrics)
        ['test_robust_acc@0.5', 'test_robust_acc@2', 'test_robust_loss_gain@0.5', 'test_robust_loss_gain@2']
        >>> robust.batches
        2
    """

    def __init__(
        self,
        epsilon: Union[NonNegativeFloat, List[NonNegativeFloat]] = 1.0,
        norm_type: Literal["l2", "linf"] = "l2",
        steps: PositiveInt = 1,
        step_size: Optional[NonNegativeFloat] = None,
        random_start: bool = False,
        num_classes: int = 2,
        embedding: Optional[str] = None,
        seed: NonNegativeInt = 0,
        validate: bool = True,
        test: bool = True,
        prog_bar: Union[bool, NonNegativeFloat] = True,
    ) -> None:
        owner = type(self).__name__
        self.epsilons = check_attack_args(owner, epsilon, norm_type, steps, step_size, random_start, seed)
        if isinstance(prog_bar, bool):
            self.bar_key: Optional[str] = epsilon_key(self.epsilons[0]) if prog_bar else None
        elif isinstance(prog_bar, (int, float)) and epsilon_key(float(prog_bar)) in [epsilon_key(e) for e in self.epsilons]:
            self.bar_key = epsilon_key(float(prog_bar))
        else:
            raise ValueError(
                f"{owner}(prog_bar={prog_bar!r}): prog_bar must be True, False or one of the epsilons "
                f"{[float(e) for e in self.epsilons]} (the robust accuracy the progress bar shows)."
            )
        check_int(owner, "num_classes", num_classes, 2, "the number of classes of the logits")
        check_module_path(owner, "embedding", embedding)
        self.epsilon = list(self.epsilons) if isinstance(epsilon, (list, tuple)) else float(epsilon)
        self.norm_type, self.steps, self.step_size, self.random_start = norm_type, steps, step_size, random_start
        self.num_classes, self.embedding, self.seed = num_classes, embedding, seed
        self.stages = [stage for stage, on in (("validate", validate), ("test", test)) if on]
        self.prog_bar = prog_bar
        self.attack: Optional[EmbeddingAttack] = None
        """The attack, built at the first measured batch (after ``configure_model``)."""
        self._metrics: Dict[Tuple[str, int, str], Any] = {}
        self.batches = 0
        """Batches evaluated under attack so far (all stages)."""
        self.nonfinite = 0
        """Examples (times epsilons) of the finished evaluation epochs, on this process, whose gradient was not
        finite at some step: not moved there, they make the robust accuracy optimistic (a warning says so)."""
        self._nonfinite: Optional[torch.Tensor] = None

    def describe(self) -> str:
        """The attack in words: ``"FGM epsilon=1"``, ``"PGD-3 linf epsilon=0.5,1"`` (the norm said when not l2)."""
        parts = ["FGM" if self.steps == 1 else f"PGD-{self.steps}"]
        if self.norm_type != "l2":
            parts.append(self.norm_type)
        parts.append(f"epsilon={','.join(epsilon_key(e) for e in self.epsilons)}")
        return " ".join(parts)

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, PROTOCOL, None)):
            raise TypeError(
                f"{type(self).__name__} needs {type(pl_module).__name__}.{PROTOCOL}(batch) -> (logits, labels): define it in "
                "the LightningModule (the logits of an evaluation batch and its integer labels), e.g. "
                "`def robust_forward(self, batch): return self(batch), batch['labels']`."
            )
        if compat.is_fsdp(trainer):
            raise ValueError(
                f"{type(self).__name__} does not support FSDPStrategy: its attack backpropagates to the perturbation "
                "only, and FSDP, whose backward hooks expect every backward to reach its flat parameters, then leaves "
                "its wrapped layers holding unregistered parameter views (a BERT wrapped layer by layer lost its "
                "encoder layers' parameters after one validation; seen in tests/fsdp_script.py), while with several "
                "processes the parameters outside FSDP's forward are shards. Measure it with one device or DDP, e.g. "
                "`Trainer(devices=1).validate(model, loader)` on a checkpoint."
            )
        if self.attack is not None and self.attack.model is not pl_module:
            self.attack = None
        if self.bar_key is not None:
            for name in _PREFIX.values():
                progress.show_as(trainer, f"{name}_robust_acc@{self.bar_key}", f"{name}_rob@{self.bar_key}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        progress.uninstall(trainer)

    def _attack_for(self, pl_module: LightningModule) -> EmbeddingAttack:
        if self.attack is None or self.attack.model is not pl_module:
            self.attack = EmbeddingAttack(
                pl_module, self.epsilon, self.norm_type, self.steps, self.step_size, self.random_start, self.embedding,
                self.seed, owner=type(self).__name__,
            )
        return self.attack

    # -- the measurement ------------------------------------------------------------------------------------
    def _on_batch(self, stage: str, trainer: Trainer, pl_module: LightningModule, batch: Any, dataloader_idx: int) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        attack = self._attack_for(pl_module)
        forward_context = trainer.precision_plugin.forward_context
        protocol = getattr(pl_module, PROTOCOL)

        def forward() -> Any:
            with forward_context():
                out = protocol(batch)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(f"{type(pl_module).__name__}.{PROTOCOL}(batch) must return (logits, labels), got {type(out).__name__}.")
            if out[0].dim() < 2 or out[0].shape[-1] == 1:
                raise ValueError(
                    f"{type(self).__name__}: {PROTOCOL} returned logits of shape {tuple(out[0].shape)}, one score per "
                    "example; RobustAccuracy measures classification accuracy and needs one logit per class (>= 2). For a "
                    "binary head with a sigmoid, return torch.cat([torch.zeros_like(z), z], dim=-1) (its softmax is "
                    "sigmoid(z)) and labels in {0, 1}; regression heads are not supported."
                )
            if out[0].shape[-1] != self.num_classes:
                raise ValueError(
                    f"{type(self).__name__}(num_classes={self.num_classes}): {PROTOCOL} returned logits of shape "
                    f"{tuple(out[0].shape)}; set num_classes to their last dimension."
                )
            return out

        with torch.inference_mode(False):
            batch = apply_to_collection(batch, torch.Tensor, lambda t: t.clone())  # inference tensors cannot enter autograd
            result = attack.run(forward)
        self.batches += 1
        bad = result.nonfinite.sum()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        name = _PREFIX[stage]
        for key, values in result.per_example().items():
            if not key.startswith("robust_") or "@" not in key:
                continue  # the clean metrics are the module's; `robust_acc` (one epsilon as a number) repeats `@eps`
            metric = self._metric(stage, dataloader_idx, key, values.device)
            metric.update(values)
            pl_module.log(
                f"{name}_{key}", metric, on_step=False, on_epoch=True, prog_bar=key == f"robust_acc@{self.bar_key}",
                metric_attribute=f"_robust_{name}_{dataloader_idx}_{key}",
            )

    def _metric(self, stage: str, dataloader_idx: int, key: str, device: torch.device) -> Any:
        metric = self._metrics.get((stage, dataloader_idx, key))
        if metric is None:
            from torchmetrics import MeanMetric

            metric = self._metrics[(stage, dataloader_idx, key)] = MeanMetric(nan_strategy="disable")
        if metric.device != device:
            metric = self._metrics[(stage, dataloader_idx, key)] = metric.to(device)
        return metric

    def _reset(self, stage: str) -> None:
        for (s, _, _), metric in self._metrics.items():
            if s == stage:
                metric.reset()
        if self.attack is not None:
            self.attack.reset()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._on_batch("validate", trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._on_batch("test", trainer, pl_module, batch, dataloader_idx)

    def _on_epoch_end(self) -> None:
        if self._nonfinite is None:
            return
        count, self._nonfinite = int(self._nonfinite), None  # one read per epoch, not per batch
        if count:
            self.nonfinite += count
            rank_zero_warn(
                f"{type(self).__name__}: the gradient of {count} attacked example(s) was not finite (a NaN or inf in the "
                "logits or the loss); they were not moved at that step, so the robust accuracy is optimistic."
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on_epoch_end()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on_epoch_end()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset("validate")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset("test")


__all__: List[str] = ["RobustAccuracy"]
