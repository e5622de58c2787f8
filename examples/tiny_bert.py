"""Train a tiny randomly initialised BERT with FGMCallback and AWPCallback, and print what the attacks did.

Runs offline on CPU in seconds: ``python examples/tiny_bert.py``. The task is synthetic (is token 7 in the
sentence?), so the numbers only show the mechanics: how often each attack ran and how much it raised the loss.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from lightning_adv import AWPCallback, FGMCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quiet import quiet  # noqa: E402

quiet()


class TinyBert(L.LightningModule):
    def __init__(self, vocab: int = 100) -> None:
        super().__init__()
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, num_labels=2)
        self.model = BertForSequenceClassification(cfg)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = self.model(input_ids=ids, labels=labels).loss
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    L.seed_everything(0)
    ids = torch.randint(1, 100, (512, 12))
    labels = (ids == 7).any(dim=1).long()
    data = DataLoader(TensorDataset(ids, labels), batch_size=32, shuffle=True)
    fgm = FGMCallback(epsilon=1.0, emb_name="word_embeddings")
    awp = AWPCallback(adv_param="weight", adv_lr=0.5, adv_eps=0.01, start_epoch=1)
    trainer = L.Trainer(max_epochs=3, callbacks=[fgm, awp], logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(TinyBert(), data)
    m = trainer.callback_metrics
    print(f"FGM: {fgm.attacks} micro-batches attacked ({fgm.skipped} skipped), mean adversarial loss of the last epoch "
          f"{float(m['adv/fgm_loss_epoch']):.4f}")
    print(f"AWP: {awp.attacks} micro-batches attacked from epoch {awp.start_epoch} ({awp.skipped} skipped), mean adversarial "
          f"loss {float(m['adv/awp_loss_epoch']):.4f}")
    print(f"clean training loss of the last epoch: {float(m['train_loss']):.4f}")


if __name__ == "__main__":
    main()
