#!/usr/bin/env python
"""Probe: the embedding-output methods (FreeLB, R3F, SMART) under Lightning's ``FSDPStrategy`` on one GPU against the
single-device run, gradient by gradient. The callbacks refuse FSDP; this script lifts the refusal to see why.

    python benchmarks/fsdp_probe.py OUT.json      # needs a CUDA GPU; ~1 min

For each method (and no method) and each strategy it records the gradients handed to the optimizer in the first
optimizer steps, and the final weights; it reports, per step, the largest gradient difference FSDP vs one device and
the ratio of their norms, and the exception if a run fails.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402

from helpers import SGDLogits, loader, make_data, trainer  # noqa: E402
from lightning_adv import FreeLBCallback, R3FCallback, SMARTCallback  # noqa: E402

EMB = "model.embeddings.word_embeddings"
MAKE = {
    "none": None,
    "freelb": lambda: FreeLBCallback(adv_lr=0.3, adv_steps=2, adv_init_mag=0.0, adv_max_norm=0.2, embedding=EMB),
    "r3f": lambda: R3FCallback(eps=0.3, r3f_lambda=2.0, embedding=EMB),
    "smart": lambda: SMARTCallback(adv_alpha=3.0, step_size=0.5, noise_var=0.1, embedding=EMB),
}


class Probe(Callback):
    """The first optimizer steps' gradients; and, to tell a different input or start from a different backward, the
    weights at the start, the first batch and the first losses."""

    def __init__(self) -> None:
        self.grads: List[List[torch.Tensor]] = []
        self.start: List[float] = []
        self.first_batch: List[int] = []
        self.losses: List[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.first_batch:
            self.first_batch = batch[0].reshape(-1).tolist()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self.losses) < 3:
            self.losses.append(float(outputs["loss"]))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = [float(p.detach().double().sum()) for p in pl_module.model.parameters()]
        for cb in trainer.callbacks:
            method = getattr(cb, "method", None)
            if method is not None and hasattr(method, "generator"):
                method.generator = torch.Generator("cuda").manual_seed(11)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if len(self.grads) < 3:
            self.grads.append([torch.zeros(p.shape) if p.grad is None else p.grad.detach().float().cpu().clone()
                               for p in pl_module.model.parameters()])


def fit(method: str, fsdp: bool) -> Dict[str, Any]:
    probe = Probe()
    cbs: List[Callback] = [probe]
    if MAKE[method] is not None:
        cb = MAKE[method]()
        type(cb).supports_fsdp = True  # lift the refusal, for the probe only
        cbs.insert(0, cb)
    module = SGDLogits(dtype=torch.float32)
    try:
        trainer(accelerator="cuda", devices=1, deterministic=False, strategy=FSDPStrategy() if fsdp else "auto",
                max_epochs=1, callbacks=cbs).fit(module, loader(make_data(16)))
    except Exception as err:  # noqa: BLE001
        return dict(error=f"{type(err).__name__}: {err}"[:400], where=traceback.format_exc().splitlines()[-12:])
    finally:
        for cb in cbs[:-1]:
            type(cb).supports_fsdp = False
    weights = torch.cat([p.detach().float().cpu().reshape(-1) for p in module.model.parameters()])
    return dict(grads=probe.grads, weights=weights, start=probe.start, first_batch=probe.first_batch, losses=probe.losses)


def main(path: str) -> None:
    report: Dict[str, Any] = {}
    for method in MAKE:
        one, sharded = fit(method, False), fit(method, True)
        if "error" in one or "error" in sharded:
            report[method] = dict(single=one.get("error"), fsdp=sharded.get("error"), where=sharded.get("where"))
        else:
            steps = []
            for g1, g2 in zip(one["grads"], sharded["grads"]):
                steps.append(dict(
                    max_diff=[float((a - b).abs().max()) for a, b in zip(g1, g2)],
                    norm_ratio=[float(b.norm() / a.norm()) if float(a.norm()) > 0 else None for a, b in zip(g1, g2)],
                ))
            report[method] = dict(weights_max_diff=float((one["weights"] - sharded["weights"]).abs().max()),
                                  same_start=one["start"] == sharded["start"],
                                  same_first_batch=one["first_batch"] == sharded["first_batch"],
                                  losses=[one["losses"], sharded["losses"]],
                                  steps=steps, optimizer_steps=[len(one["grads"]), len(sharded["grads"])])
        print(method, json.dumps(report[method])[:1500], flush=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
