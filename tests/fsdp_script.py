"""Lightning's FSDPStrategy on one device against the default strategy, fit for fit; run in a subprocess (FSDP
initialises a process group) by tests/test_fsdp.py on the CPU and by tests/test_cuda.py on a GPU:

    python tests/fsdp_script.py OUT.json cpu|cuda

On the GPU it is Lightning's own ``FSDPStrategy()``; on the CPU the same strategy with the module wrapped for the CPU
(``helpers.cpu_fsdp_strategy``). On one device FSDP runs ``NO_SHARD``: flat parameters, ``.grad`` views and its
backward hooks, without the reduction. Writes, per configuration (``ddp_script.parse`` format on the tiny text model;
``BERT_CONFIGS`` on a 2-layer BertForSequenceClassification wrapped by FSDP layer by layer), the final weights
of both fits and the attack counts, and the messages that refuse FGM, AWP, PGD and RobustAccuracy (whose attack,
a backward to the perturbation only, leaves FSDP-wrapped layers holding unregistered parameter views: with the
refusal lifted, the layer-wrapped BERT counted 2,482 parameters after a fit with validation instead of 6,930).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402

import lightning as L  # noqa: E402
import transformers  # noqa: E402
from torch.distributed.fsdp.wrap import ModuleWrapPolicy  # noqa: E402

from ddp_script import callbacks_for, module_for, parse  # noqa: E402
from helpers import BatchSeeded, cpu_fsdp_strategy, end_distributed, loader, make_data, trainer  # noqa: E402
from lightning_adv import AWPCallback, FGMCallback, FreeLBCallback, PGDCallback, R3FCallback, RobustAccuracy, SMARTCallback  # noqa: E402
from test_usage import hf_batches  # noqa: E402

CONFIGS = [
    "none_k2:none:1:2:32-true:0:0",
    "freelb2_k1:freelb:2:1:32-true:0:0",
    "freelb2_k2:freelb:2:2:32-true:0:0",
    "freelb1_linf_k1:freelb_linf:1:1:32-true:0:0",
    "r3f_k2:r3f:1:2:32-true:0:0",
    "smart_k1:smart:1:1:32-true:0:0",
    "smart2_k2:smart:2:2:32-true:0:0",
]
# Manual optimization is left out: Lightning 2.6 runs training_step inside FSDP's forward, where FSDP refuses a
# backward (plain manual_backward fails the same way: "Expects BACKWARD_PRE or BACKWARD_POST state").


# -- a real transformers model, FSDP-wrapped layer by layer ---------------------------------------------------------


class TinyBert(L.LightningModule):
    """A 2-layer BertForSequenceClassification (no dropout: the same computation under every strategy), plain SGD;
    the step returns ``{"loss", "logits"}``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=2, pad_token_id=0, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))

    def training_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def bert_callbacks(method: str) -> List[Any]:
    if method == "freelb":
        return [FreeLBCallback(adv_lr=0.3, adv_steps=2, adv_init_mag=0.0, adv_max_norm=0.2)]
    if method == "r3f":
        return [R3FCallback(eps=0.1, r3f_lambda=2.0, noise_type="normal"), BatchSeeded()]
    if method == "smart":
        return [SMARTCallback(adv_alpha=2.0, step_size=0.5, noise_var=0.1), BatchSeeded()]
    return []


def bert_fsdp(device: str, **kwargs: Any) -> Any:
    wrap = ModuleWrapPolicy({transformers.models.bert.modeling_bert.BertLayer})  # one FSDP unit per layer, and the root
    return FSDPStrategy(auto_wrap_policy=wrap, **kwargs) if device == "cuda" else cpu_fsdp_strategy(auto_wrap_policy=wrap, **kwargs)


def bert_fit(method: str, accumulate: int, device: str, fsdp: bool) -> Dict[str, Any]:
    module, cbs = TinyBert(), bert_callbacks(method)
    trainer(accelerator=device, devices=1, deterministic=device == "cpu", strategy=bert_fsdp(device) if fsdp else "auto",
            max_epochs=1, accumulate_grad_batches=accumulate, callbacks=cbs,
            use_distributed_sampler=False).fit(module, hf_batches("cls", 0, n=16))
    return dict(weights=weights(module), attacks=[cb.attacks for cb in cbs if hasattr(cb, "attacks")])


BERT_CONFIGS = ["bert_none_k2:none:2", "bert_freelb_k2:freelb:2", "bert_r3f_k2:r3f:2", "bert_smart_k2:smart:2"]


def weights(module: Any) -> List[float]:
    return torch.cat([p.detach().float().cpu().reshape(-1) for p in module.model.parameters()]).tolist()


def fit(cfg: Dict[str, Any], device: str, fsdp: bool) -> Dict[str, Any]:
    strategy = (FSDPStrategy() if device == "cuda" else cpu_fsdp_strategy()) if fsdp else "auto"
    module = module_for(cfg, torch.float32, accumulate=cfg["accumulate"])
    cbs = callbacks_for(cfg)
    trainer(accelerator=device, devices=1, deterministic=device == "cpu", strategy=strategy, max_epochs=2,
            accumulate_grad_batches=1 if cfg["manual"] else cfg["accumulate"], callbacks=cbs,
            use_distributed_sampler=False).fit(module, loader(make_data(16), batch_size=2))
    return dict(weights=weights(module), attacks=[cb.attacks for cb in cbs if hasattr(cb, "attacks")])


def robust_refused(device: str) -> str:
    from test_robust import RobustModule, eval_loader, examples

    strategy = FSDPStrategy() if device == "cuda" else cpu_fsdp_strategy()
    try:
        trainer(accelerator=device, devices=1, strategy=strategy, max_epochs=1, callbacks=[RobustAccuracy()],
                use_distributed_sampler=False).fit(RobustModule(), eval_loader(examples(10)), eval_loader(examples(10)))
        return "ran"
    except ValueError as err:
        return str(err)


class RobustBert(TinyBert):
    def robust_forward(self, batch: Any) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


def robust_lifted(device: str) -> Dict[str, int]:
    """Why RobustAccuracy is refused: with the refusal lifted, the parameters the layer-wrapped BERT still registers
    after a fit with validation, with and without it."""
    from unittest import mock

    from lightning_adv.callbacks import robust as robust_module

    counts: Dict[str, int] = {}
    for name, cbs in (("plain", []), ("robust", [RobustAccuracy(embedding="model.bert.embeddings.word_embeddings")])):
        module = RobustBert()
        with mock.patch.object(robust_module.compat, "is_fsdp", lambda trainer: False):
            trainer(accelerator=device, devices=1, strategy=bert_fsdp(device), max_epochs=1, callbacks=cbs,
                    use_distributed_sampler=False).fit(module, hf_batches("cls", 0, n=8), hf_batches("cls", 0, n=4, seed=3))
        counts[name] = sum(p.numel() for p in module.model.parameters())
    return counts


def main(path: str, device: str) -> None:
    report: Dict[str, Any] = {}
    for config in CONFIGS:
        cfg = parse(config)
        report[cfg["name"]] = dict(single=fit(cfg, device, False), fsdp=fit(cfg, device, True))
    for config in BERT_CONFIGS:
        name, method, accumulate = config.split(":")
        report[name] = dict(single=bert_fit(method, int(accumulate), device, False), fsdp=bert_fit(method, int(accumulate), device, True))
    refused: Dict[str, str] = {"RobustAccuracy": robust_refused(device)}
    for make in (FGMCallback, AWPCallback, PGDCallback):
        try:
            strategy = FSDPStrategy() if device == "cuda" else cpu_fsdp_strategy()
            trainer(accelerator=device, devices=1, strategy=strategy, max_steps=1,
                    callbacks=[make()]).fit(module_for(parse("x:fgm:1:1:32-true:0:0"), torch.float32), loader(make_data(8)))
            refused[make.__name__] = "ran"
        except ValueError as err:
            refused[make.__name__] = str(err)
    report["refused"] = refused
    report["robust_lifted"] = robust_lifted(device)
    with open(path, "w") as f:
        json.dump(report, f)
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
