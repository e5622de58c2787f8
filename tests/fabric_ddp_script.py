"""Fabric DDP on 2 CPU ranks (gloo) with lightning_adv.fabric.adversarial_backward; saves every rank's weights
after every optimizer step and which backward passes all-reduced.

Launched by tests/test_fabric.py as ``python tests/fabric_ddp_script.py OUT_DIR [--find-unused] CONFIG [CONFIG ...]``,
a CONFIG being ``methods:accumulate`` (methods: ``none`` or names joined by ``+``, see :func:`build_methods`). Fabric re-runs this
script for rank 1. The helpers below are shared with the test (the single-process reference).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

from typing import Any, List  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from helpers import TinyText, end_distributed, make_data  # noqa: E402
from lightning_adv import AWP, FGM, PGD, R3F, SAM, VAT, FreeLB  # noqa: E402

WORLD, BATCH, EPOCHS, LR = 2, 2, 2, 0.05


def make_net(dtype: torch.dtype = torch.float64, seed: int = 0, unused: bool = False) -> nn.Module:
    """TinyText; with ``unused``, plus a layer the forward never calls (what ``find_unused_parameters`` is for)."""
    torch.manual_seed(seed)
    net = TinyText()
    if unused:
        net.unused = nn.Linear(2, 2)
    return net.to(dtype)


def build_methods(spec: str, model: nn.Module, freelb_init: float = 0.0, unwrap_freelb: bool = True, rank: int = 0) -> List[Any]:
    """The methods named in ``spec`` (``"fgm+awp"``), built on ``model`` (the Fabric module, when it is one); with
    ``unwrap_freelb``, FreeLB on ``model.module`` (the user's module) instead: both must work. R3F draws its noise
    from a generator of its own, seeded by ``rank`` (the single-process reference keeps one per rank)."""
    methods: List[Any] = []
    for name in [] if spec == "none" else spec.split("+"):
        if name == "fgm":
            methods.append(FGM(model, epsilon=0.7, emb_name="word_embeddings"))
        elif name == "awp":
            methods.append(AWP(model, adv_param="weight", adv_lr=0.5, adv_eps=0.05, adv_step=2))
        elif name == "pgd":  # epsilon < 2 * alpha: the projection is active from the second pass on
            methods.append(PGD(model, epsilon=0.25, alpha=0.2, steps=2, emb_name="word_embeddings"))
        elif name == "freelb":
            inner = getattr(model, "module", model) if unwrap_freelb else model
            methods.append(FreeLB(inner, adv_lr=0.3, adv_steps=2, adv_init_mag=freelb_init, adv_max_norm=0.2,
                                  embedding="embeddings.word_embeddings"))
        elif name == "r3f":  # extends the clean loss: the clean backward is the last one, DDP's reducer armed by the engine
            methods.append(R3F(model, eps=0.05, r3f_lambda=1.0, embedding="embeddings.word_embeddings",
                               generator=torch.Generator().manual_seed(100 + rank)))
        elif name == "vat":  # VAT's noise from a generator of its own, as R3F's
            methods.append(VAT(model, adv_alpha=2.0, adv_step_size=0.5, noise_var=0.1, embedding="embeddings.word_embeddings",
                               generator=torch.Generator().manual_seed(200 + rank)))
        elif name == "sam":
            methods.append(SAM(model, rho=0.2))
        else:
            raise ValueError(name)
    return methods


def loss_of(model: nn.Module, ids: torch.Tensor, y: torch.Tensor, divide: int, methods: List[Any]) -> Any:
    """The loss of a micro-batch divided by ``divide``, with the logits when a method needs them (R3F)."""
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits, y) / divide
    return {"loss": loss, "logits": logits} if any(m.needs_logits for m in methods) else loss


def rank_batches(rank: int, world: int = WORLD) -> list:
    """The micro-batches of ``rank``: DistributedSampler's share without shuffling, BATCH samples each."""
    ids, y = make_data(16).tensors
    idx = torch.arange(rank, len(y), world)
    return [(ids[idx[i:i + BATCH]], y[idx[i:i + BATCH]]) for i in range(0, len(idx), BATCH)]


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()


def main() -> None:
    from lightning.fabric import Fabric
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lightning_adv.fabric import adversarial_backward

    from lightning.fabric.strategies import DDPStrategy

    out, configs = sys.argv[1], [c for c in sys.argv[2:] if not c.startswith("--")]
    find_unused = "--find-unused" in sys.argv
    torch.set_default_dtype(torch.float64)  # "64-true" casts the outputs to the default dtype: keep the loss in float64
    strategy = DDPStrategy(find_unused_parameters=find_unused)
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy=strategy, precision="64-true")
    fabric.launch()

    backwards = [0]  # fabric.backward calls so far
    reduced: List[int] = []  # for every all-reduced bucket: the index of the backward pass that reduced it
    fabric_backward = fabric.backward

    def counted_backward(*args: Any, **kwargs: Any) -> None:
        backwards[0] += 1
        fabric_backward(*args, **kwargs)

    fabric.backward = counted_backward

    def counting_allreduce(state, bucket):  # no annotations: DDP checks them (and they'd be strings here)
        reduced.append(backwards[0])
        return default_hooks.allreduce_hook(state, bucket)

    for cfg in configs:
        spec, k = cfg.split(":")[0], int(cfg.split(":")[1])
        net = make_net(unused=find_unused)
        model, optimizer = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=LR))
        model._forward_module.register_comm_hook(None, counting_allreduce)  # Fabric registers none on CPU
        methods = build_methods(spec, model, rank=fabric.global_rank)
        batches = rank_batches(fabric.global_rank)
        weights, steps, attacks, skipped, losses = [], [], [0] * len(methods), [0] * len(methods), []
        first_backward, first_reduced = backwards[0], len(reduced)
        for _ in range(EPOCHS):
            for i, (ids, y) in enumerate(batches):
                stepping = (i + 1) % k == 0

                def loss_fn() -> Any:
                    return loss_of(model, ids, y, k, methods)

                with fabric.no_backward_sync(model, enabled=not stepping):
                    loss, outcomes = adversarial_backward(fabric, model, methods, loss_fn)
                losses.append(float(loss))
                for j, o in enumerate(outcomes):
                    attacks[j] += 1
                    skipped[j] += int(o.skipped)
                if stepping:
                    optimizer.step()
                    optimizer.zero_grad()
                    weights.append(flat(net))
                    # the backward passes of this optimizer step, and the ones (each counted once) that all-reduced
                    steps.append(dict(backwards=list(range(first_backward + 1, backwards[0] + 1)),
                                      reduced=sorted(set(reduced[first_reduced:])), buckets=len(reduced) - first_reduced))
                    first_backward, first_reduced = backwards[0], len(reduced)
        name = cfg.replace(":", "_").replace("+", "-")
        torch.save(dict(weights=weights, steps=steps, attacks=attacks, skipped=skipped, losses=losses),
                   os.path.join(out, f"{name}_rank{fabric.global_rank}.pt"))
        fabric.barrier()
    end_distributed()


if __name__ == "__main__":
    main()
