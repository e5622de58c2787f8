"""A BertForSequenceClassification wrapped by FSDP layer by layer on 2 CPU processes (gloo), against one process.

Launched by tests/test_fsdp.py as ``python tests/fsdp_bert_script.py OUT_DIR SHARDING CONFIG [CONFIG ...]``
(SHARDING: ``FULL_SHARD`` or ``NO_SHARD``; CONFIG: ``name:method:accumulate``); Lightning re-runs it for rank 1. Each
rank reads its DistributedSampler share in order (batches of 2) and saves the gathered weights after one epoch; rank 0
then fits one process with ``accumulate_grad_batches = 2 * accumulate`` over the same micro-batches in the order the
ranks read them and saves those weights too.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, Subset  # noqa: E402

from fsdp_script import TinyTransformer, hf_callbacks, layer_fsdp  # noqa: E402
from helpers import end_distributed, trainer  # noqa: E402
from test_usage import hf_batches  # noqa: E402

N, BATCH, WORLD = 16, 2, 2
ROWS = hf_batches("cls", 0, n=N)


class Shares(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(ROWS.dataset, num_replicas=WORLD, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(ROWS.dataset, batch_size=BATCH, collate_fn=ROWS.collate_fn, sampler=sampler)


def flat(module: TinyTransformer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.model.parameters()]).clone()


def main(out: str, sharding: str, configs: list) -> None:
    for config in configs:
        name, method, accumulate = config.split(":")
        module, cbs = TinyTransformer(), hf_callbacks(method)
        t = trainer(accelerator="cpu", devices=WORLD, strategy=layer_fsdp("cpu", sharding_strategy=sharding), max_epochs=1,
                    accumulate_grad_batches=int(accumulate), callbacks=cbs, use_distributed_sampler=False)
        t.fit(module, datamodule=Shares())
        with FullyShardedDataParallel.summon_full_params(t.strategy.model, writeback=False):
            weights = flat(module)
        attacks = [cb.attacks for cb in cbs if hasattr(cb, "attacks")]
        torch.save(dict(weights=weights, attacks=attacks), os.path.join(out, f"{name}_rank{t.global_rank}.pt"))
        if t.global_rank == 0:
            shares = [list(range(r, N, WORLD)) for r in range(WORLD)]
            order = [i for s in range(N // WORLD // BATCH) for r in range(WORLD) for i in shares[r][s * BATCH:(s + 1) * BATCH]]
            reference = TinyTransformer()
            trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=WORLD * int(accumulate),
                    callbacks=hf_callbacks(method)).fit(
                reference, DataLoader(Subset(ROWS.dataset, order), batch_size=BATCH, collate_fn=ROWS.collate_fn))
            torch.save(flat(reference), os.path.join(out, f"{name}_reference.pt"))
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
