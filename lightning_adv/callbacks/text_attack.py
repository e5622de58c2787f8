"""TextAttackAccuracy: accuracy under the DeepWordBug character-level attack on the raw text, in ``trainer.test``."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from lightning_adv.core.checks import NonNegativeInt, PositiveInt, check_int
from lightning_adv.core.text_attack import TextAttackResult, deepwordbug_attack, select_examples, summarize

PREDICT = "predict_texts"
EXAMPLES = "text_examples"
_PREFIX = {"validate": "val", "test": "test"}
#: logged key (after ``<stage>_deepwordbug_``) -> summary key of :func:`~lightning_adv.core.text_attack.summarize`
LOGGED = {"acc": "attack_acc", "clean_acc": "clean_acc", "success_rate": "attack_success_rate",
          "queries": "queries", "perturbed_word_pct": "perturbed_word_pct"}


class TextAttackAccuracy(Callback):
    """Accuracy under DeepWordBug (Gao et al. 2018; TextAttack's ``DeepWordBugGao2018`` recipe, re-implemented in
    :mod:`lightning_adv.core.text_attack`): characters of the most important words swapped, substituted, deleted
    or inserted, greedily, within a Levenshtein distance of ``max_edit_distance`` of the sentence, stopwords never
    changed. A black-box attack on the text itself: only the model's predictions are used.

    At the end of every test epoch (and of validation with ``validate=True``; never in the sanity check) it attacks
    ``num_examples`` sentences drawn with ``random.Random(seed)`` (the same ones every time) and logs, at epoch
    level:

    - ``test_deepwordbug_acc``: accuracy under attack (sentences classified right and not flipped, over all);
    - ``test_deepwordbug_clean_acc``: clean accuracy on the same sentences;
    - ``test_deepwordbug_success_rate``: flipped over classified right;
    - ``test_deepwordbug_queries``: mean model queries per attacked sentence;
    - ``test_deepwordbug_perturbed_word_pct``: mean % of words changed in the successful attacks (NaN if none).

    (``val_`` instead of ``test_`` during validation.) The per-sentence results are kept in :attr:`results`, the
    summary in :attr:`summary`, and written as JSON to ``save_path`` if given. With several processes the sentences
    are split between them and the counts summed (each rank attacks its share).

    **Protocol.** The LightningModule defines ``predict_texts(texts: list[str]) -> logits`` (``[len(texts),
    num_classes]``: it tokenizes, pads and runs the model; it is called in eval mode under no gradient, inside the
    precision plugin's forward context). The sentences and their integer labels come from ``texts``/``labels`` if
    given, else from ``text_examples(stage) -> (texts, labels)`` (``stage`` is ``"test"`` or ``"validate"``) of the
    datamodule, else of the LightningModule.

    Args:
        num_examples: sentences attacked (a fixed random sample; None: all of them).
        seed: seed of that sample and of the attack's random character draws.
        max_edit_distance: the Levenshtein bound (30 in the recipe).
        max_queries: model queries allowed per sentence (None: unlimited, the recipe).
        batch_size: texts per ``predict_texts`` call.
        texts, labels: the sentences and labels to attack, instead of ``text_examples``.
        validate: also measure at the end of validation (``val_*``), fit's included.
        test: measure at the end of test (``test_*``).
        save_path: write the summary and the per-sentence results there (JSON), after each measurement.
        prog_bar: show the accuracy under attack in the progress bar.

    Example::

        >>> import torch, lightning as L
        >>> class Keyword(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.tensor(2.0))
        ...     def predict_texts(self, texts):
        ...         s = torch.stack([self.w * ("good" in t.split()) - 1 for t in texts])
        ...         return torch.stack([-s, s], dim=1)
        ...     def test_step(self, batch, batch_idx):
        ...         pass
        >>> attack = TextAttackAccuracy(texts=["a good film", "a dull film"], labels=[1, 0], num_examples=None)
        >>> trainer = L.Trainer(callbacks=[attack], logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> metrics = trainer.test(Keyword(), [torch.zeros(1)], verbose=False)[0]
        >>> metrics["test_deepwordbug_clean_acc"], metrics["test_deepwordbug_acc"], metrics["test_deepwordbug_success_rate"]
        (1.0, 0.5, 0.5)
        >>> [r.status for r in attack.results]
        ['succeeded', 'failed']
    """

    def __init__(
        self,
        num_examples: Optional[PositiveInt] = 100,
        seed: NonNegativeInt = 0,
        max_edit_distance: Optional[NonNegativeInt] = 30,
        max_queries: Optional[PositiveInt] = None,
        batch_size: PositiveInt = 64,
        texts: Optional[List[str]] = None,
        labels: Optional[List[int]] = None,
        validate: bool = False,
        test: bool = True,
        save_path: Optional[str] = None,
        prog_bar: bool = False,
    ) -> None:
        owner = type(self).__name__
        if num_examples is not None:
            check_int(owner, "num_examples", num_examples, 1, "or None: all the sentences")
        check_int(owner, "seed", seed, 0)
        if max_edit_distance is not None:
            check_int(owner, "max_edit_distance", max_edit_distance, 0, "or None: no bound")
        if max_queries is not None:
            check_int(owner, "max_queries", max_queries, 1, "or None: unlimited")
        check_int(owner, "batch_size", batch_size, 1)
        if (texts is None) != (labels is None) or (texts is not None and len(texts) != len(labels)):
            raise ValueError(f"{owner}: give texts and labels together, one label per text (or neither, to use "
                             f"{EXAMPLES}(stage)).")
        self.num_examples, self.seed, self.max_edit_distance = num_examples, seed, max_edit_distance
        self.max_queries, self.batch_size = max_queries, batch_size
        self.texts, self.labels = (list(texts), [int(y) for y in labels]) if texts is not None else (None, None)
        self.stages = [stage for stage, on in (("validate", validate), ("test", test)) if on]
        self.save_path, self.prog_bar = save_path, prog_bar
        self.results: List[TextAttackResult] = []
        """The per-sentence results of the last measurement (this process's share)."""
        self.summary: Dict[str, float] = {}
        """The summary of the last measurement, over all processes (:func:`~lightning_adv.core.text_attack.summarize`)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, PREDICT, None)):
            raise TypeError(
                f"{type(self).__name__} needs {type(pl_module).__name__}.{PREDICT}(texts) -> logits: define it in the "
                "LightningModule (tokenize the list of strings, run the model, return [len(texts), num_classes] "
                "logits), e.g. `def predict_texts(self, texts): return self(self.tokenizer(texts, padding=True, "
                "return_tensors='pt').to(self.device))`."
            )

    def _examples(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> Tuple[List[str], List[int]]:
        if self.texts is not None:
            return self.texts, self.labels
        for owner in (getattr(trainer, "datamodule", None), pl_module):
            fn = getattr(owner, EXAMPLES, None)
            if callable(fn):
                texts, labels = fn(stage)
                if len(texts) != len(labels):
                    raise ValueError(f"{type(owner).__name__}.{EXAMPLES}({stage!r}) returned {len(texts)} texts and {len(labels)} labels.")
                return list(texts), [int(y) for y in labels]
        raise TypeError(
            f"{type(self).__name__} needs the raw sentences: pass texts= and labels=, or define "
            f"{EXAMPLES}(stage) -> (texts, labels) in the datamodule or in {type(pl_module).__name__}."
        )

    def measure(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> Dict[str, float]:
        """Attack the sample of ``stage``'s sentences now; log (when called from a hook) and return the summary."""
        texts, labels = self._examples(trainer, pl_module, stage)
        chosen = select_examples(len(texts), self.num_examples, self.seed)
        rank, world = trainer.global_rank, trainer.world_size
        mine = chosen[rank::world]
        predict = getattr(pl_module, PREDICT)
        forward_context = trainer.precision_plugin.forward_context

        def predict_fn(batch: List[str]) -> Any:
            with forward_context():
                return predict(batch)

        self.results, _ = deepwordbug_attack(
            predict_fn, [texts[i] for i in mine], [labels[i] for i in mine], seed=self.seed,
            max_edit_distance=self.max_edit_distance, max_queries=self.max_queries, batch_size=self.batch_size,
        )
        self.summary = self._reduce(trainer, pl_module.device) if world > 1 else summarize(self.results)
        if self.save_path and trainer.is_global_zero:
            os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
            with open(self.save_path, "w") as f:
                json.dump({"stage": stage, "seed": self.seed, "indices": chosen, "summary": self.summary,
                           "results": [r.to_dict() for r in self.results]}, f, indent=1)
        return self.summary

    def _reduce(self, trainer: Trainer, device: torch.device) -> Dict[str, float]:
        """The summary over all processes, from summed counts."""
        rs = self.results
        wins = [r for r in rs if r.status == "succeeded"]
        attacked = [r for r in rs if r.status != "skipped"]
        local = torch.tensor([
            len(rs), len(wins), sum(1 for r in rs if r.status == "failed"), len(rs) - len(attacked),
            sum(r.queries for r in attacked), sum(r.perturbed_word_pct for r in wins), sum(r.edit_distance for r in wins),
        ], dtype=torch.float64, device=device)
        n, succ, failed, skipped, queries, pct, dist = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        nan = float("nan")
        return {
            "n": n, "clean_acc": (n - skipped) / n if n else nan, "attack_acc": failed / n if n else nan,
            "attack_success_rate": succ / (succ + failed) if succ + failed else 0.0,
            "queries": queries / (succ + failed) if succ + failed else nan,
            "perturbed_word_pct": pct / succ if succ else nan, "edit_distance": dist / succ if succ else nan,
            "succeeded": succ, "failed": failed, "skipped": skipped,
        }

    def _on_epoch_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        summary = self.measure(trainer, pl_module, stage)
        prefix = f"{_PREFIX[stage]}_deepwordbug_"
        for name, key in LOGGED.items():
            pl_module.log(prefix + name, float(summary[key]), on_step=False, on_epoch=True,
                          prog_bar=self.prog_bar and name == "acc")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on_epoch_end("validate", trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on_epoch_end("test", trainer, pl_module)


__all__: List[str] = ["TextAttackAccuracy"]
