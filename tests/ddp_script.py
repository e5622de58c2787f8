"""Runs a matrix of 2-rank CPU DDP or FSDP fits (gloo) and saves every rank's weights after every optimizer step.

Launched by tests/test_ddp.py and tests/test_fsdp.py as ``python tests/ddp_script.py OUT_DIR STRATEGY CONFIG
[CONFIG ...]``; STRATEGY is ``ddp``, ``ddp_spawn``, ``fsdp`` (FULL_SHARD) or ``fsdp_no_shard``; a CONFIG is
``name:method:adv_step:accumulate:precision:find_unused:manual``. Lightning re-runs this script for rank 1.
"""

from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

from helpers import BatchSeeded, LogitsText, ManualText, TextModule, cpu_fsdp_strategy, end_distributed, make_data, trainer  # noqa: E402
from lightning_adv import (  # noqa: E402
    AWPCallback, FGMCallback, FreeLBCallback, MomentumSAMCallback, NEFTuneCallback, PGDCallback, R3FCallback, SAMCallback,
    SMARTCallback, VATCallback,
)
from lightning_adv.callbacks.compat import is_fsdp  # noqa: E402

ALLREDUCES = [0]


def full_params(trainer):
    """FSDP shards the parameters between steps: gather them to record (a collective, every rank calls it)."""
    if not is_fsdp(trainer):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)


def counting_allreduce(state, bucket):
    """The default all-reduce hook, counted."""
    ALLREDUCES[0] += 1
    return default_hooks.allreduce_hook(state, bucket)


class Recorder(Callback):
    def __init__(self) -> None:
        self.weights, self.allreduces, self._seen = [], [], 0

    def on_fit_start(self, trainer, pl_module):
        # Lightning registers DDP comm hooks only on CUDA: register the counting hook on CPU ourselves
        if hasattr(trainer.strategy.model, "register_comm_hook") and not is_fsdp(trainer):
            trainer.strategy.model.register_comm_hook(None, counting_allreduce)
        self._seen = ALLREDUCES[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.weights):
            net = pl_module.model
            with full_params(trainer):
                self.weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]).clone())
            self.allreduces.append(ALLREDUCES[0] - self._seen)
            self._seen = ALLREDUCES[0]


class Data(L.LightningDataModule):
    """Each rank reads its DistributedSampler share in order (no shuffling), 2 samples per batch."""

    def train_dataloader(self) -> DataLoader:
        ds = make_data(16)
        sampler = DistributedSampler(ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=2, sampler=sampler)


class CloseGroupAtTeardown(Callback):
    """ddp_spawn: the workers exit after the fit, with their process group still open (see end_distributed)."""

    def teardown(self, trainer, pl_module, stage):
        end_distributed()


def parse(config: str) -> dict:
    name, method, adv_step, acc, precision, find_unused, manual = config.split(":")
    return dict(name=name, method=method, adv_step=int(adv_step), accumulate=int(acc), precision=precision,
                find_unused=find_unused == "1", manual=manual == "1")


def callbacks_for(cfg: dict) -> list:
    if cfg["method"] == "fgm":
        return [FGMCallback(epsilon=0.7)]
    if cfg["method"] == "awp":
        return [AWPCallback(adv_lr=0.5, adv_eps=0.05, adv_step=cfg["adv_step"])]
    if cfg["method"] == "pgd":  # epsilon < 2 * alpha: the projection is active from the second pass on
        return [PGDCallback(epsilon=0.25, alpha=0.2, steps=cfg["adv_step"])]
    if cfg["method"].startswith("freelb"):  # "freelb" (l2) or "freelb_linf"; adv_init_mag=0: deterministic
        linf = cfg["method"].endswith("linf")
        return [FreeLBCallback(adv_lr=0.3, adv_steps=cfg["adv_step"], adv_init_mag=0.0, adv_max_norm=0.05 if linf else 0.2,
                               norm_type="linf" if linf else "l2", embedding="model.embeddings.word_embeddings")]
    if cfg["method"] == "r3f":  # the noise seeded by the batch: the same on a rank and in the reference
        return [R3FCallback(eps=0.1, r3f_lambda=2.0, noise_type="normal", embedding="model.embeddings.word_embeddings"), BatchSeeded()]
    if cfg["method"] in ("sam", "asam"):  # from the rank's local gradient, as the paper and Composer
        return [SAMCallback(rho=0.5 if cfg["method"] == "asam" else 0.1, adaptive=cfg["method"] == "asam")]
    if cfg["method"] == "neftune":  # the noise seeded by the batch, as R3F's
        return [NEFTuneCallback(noise_alpha=5.0, embedding="model.embeddings.word_embeddings"), BatchSeeded()]
    if cfg["method"] == "vat":  # the noise seeded by the batch, as SMART's
        return [VATCallback(adv_alpha=2.0, embedding="model.embeddings.word_embeddings"), BatchSeeded()]
    if cfg["method"] == "msam":
        return [MomentumSAMCallback(rho=0.1)]
    if cfg["method"] == "smart":
        return [SMARTCallback(adv_alpha=2.0, step_size=0.5, noise_var=0.1, steps=cfg["adv_step"], embedding="model.embeddings.word_embeddings"), BatchSeeded()]
    return []


def module_for(cfg: dict, dtype: torch.dtype, accumulate: int = 1) -> L.LightningModule:
    if cfg["manual"]:
        return ManualText(accumulate=accumulate, dtype=dtype)
    return LogitsText(dtype=dtype) if cfg["method"] in ("r3f", "smart", "vat") else TextModule(dtype=dtype)


def main() -> None:
    out, strategy_name, configs = sys.argv[1], sys.argv[2], [parse(c) for c in sys.argv[3:]]
    for cfg in configs:
        dtype = torch.float64 if cfg["precision"] == "64-true" else torch.float32
        module = module_for(cfg, dtype)
        recorder = Recorder()
        attack_cbs = callbacks_for(cfg)
        if strategy_name.startswith("fsdp"):  # "fsdp" (FULL_SHARD) or "fsdp_no_shard"
            strategy = cpu_fsdp_strategy(sharding_strategy="NO_SHARD" if strategy_name == "fsdp_no_shard" else "FULL_SHARD")
        else:
            strategy = DDPStrategy(find_unused_parameters=cfg["find_unused"], start_method="spawn" if strategy_name == "ddp_spawn" else "popen")
        closing = [CloseGroupAtTeardown()] if strategy_name == "ddp_spawn" else []
        t = trainer(max_epochs=2, devices=2, strategy=strategy, precision=cfg["precision"],
                    accumulate_grad_batches=1 if cfg["manual"] else cfg["accumulate"], callbacks=attack_cbs + [recorder] + closing,
                    use_distributed_sampler=False)
        t.fit(module, datamodule=Data())
        metrics = {k: float(v) for k, v in t.callback_metrics.items()}
        result = dict(weights=recorder.weights, allreduces=recorder.allreduces, metrics=metrics,
                      attacks=[cb.attacks for cb in attack_cbs if hasattr(cb, "attacks")], rank=t.global_rank)
        if strategy_name == "ddp_spawn":  # the main process gets back only callback_metrics: check them there
            if t.global_rank == 0:
                torch.save(dict(metrics=metrics, attacks=[cb.attacks for cb in attack_cbs if hasattr(cb, "attacks")]), os.path.join(out, f"{cfg['name']}_main.pt"))
        else:
            torch.save(result, os.path.join(out, f"{cfg['name']}_rank{t.global_rank}.pt"))
    end_distributed()


if __name__ == "__main__":
    main()
