"""Lightning's FSDPStrategy on one device against the default strategy, fit for fit; run in a subprocess (FSDP
initialises a process group) by tests/test_fsdp.py on the CPU and by tests/test_cuda.py on a GPU:

    python tests/fsdp_script.py OUT.json cpu|cuda

On the GPU it is Lightning's own ``FSDPStrategy()``; on the CPU the same strategy with the module wrapped for the CPU
(``helpers.cpu_fsdp_strategy``). On one device FSDP runs ``NO_SHARD``: flat parameters, ``.grad`` views and its
backward hooks, without the reduction. Writes, per configuration (``ddp_script.parse`` format on the tiny text model;
``HF_CONFIGS`` on 2-layer BERT, GPT-2 and Llama classifiers wrapped by FSDP layer by layer, some with a frozen
input embedding), the final weights
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
from lightning_adv import (  # noqa: E402
    AWPCallback, FGMCallback, FreeLBCallback, NEFTuneCallback, PGDCallback, R3FCallback, RobustAccuracy,
    RDropCallback, SAMCallback, SMARTCallback, VATCallback,
)
from test_usage import hf_batches  # noqa: E402

CONFIGS = [
    "none_k2:none:1:2:32-true:0:0",
    "freelb2_k1:freelb:2:1:32-true:0:0",
    "freelb2_k2:freelb:2:2:32-true:0:0",
    "freelb1_linf_k1:freelb_linf:1:1:32-true:0:0",
    "r3f_k2:r3f:1:2:32-true:0:0",
    "smart_k1:smart:1:1:32-true:0:0",
    "smart2_k2:smart:2:2:32-true:0:0",
    "neftune_k2:neftune:1:2:32-true:0:0",
    "sam_k2:sam:1:2:32-true:0:0",
    "asam_k1:asam:1:1:32-true:0:0",
    "msam_k2:msam:1:2:32-true:0:0",
]
# Manual optimization is left out: Lightning 2.6 runs training_step inside FSDP's forward, where FSDP refuses a
# backward (plain manual_backward fails the same way: "Expects BACKWARD_PRE or BACKWARD_POST state").


# -- real transformers models, FSDP-wrapped layer by layer ----------------------------------------------------------


def _bert() -> Any:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def _bert_dropout() -> Any:  # R-Drop needs dropout: the masks drawn alike under both strategies (one device)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, pad_token_id=0, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1))


def _gpt2() -> Any:
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=2, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _llama() -> Any:
    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, num_labels=2, pad_token_id=0))


#: architecture -> (build, the layer class FSDP wraps as a unit of its own)
ARCHS = {
    "bert": (_bert, "transformers.models.bert.modeling_bert.BertLayer"),
    "bert_dropout": (_bert_dropout, "transformers.models.bert.modeling_bert.BertLayer"),
    "gpt2": (_gpt2, "transformers.models.gpt2.modeling_gpt2.GPT2Block"),
    "llama": (_llama, "transformers.models.llama.modeling_llama.LlamaDecoderLayer"),
}


def _layer_class(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


class TinyTransformer(L.LightningModule):
    """A 2-layer ``*ForSequenceClassification`` (no dropout: the same computation under every strategy), plain SGD
    on the trainable parameters; ``frozen`` freezes the input embedding; the step returns ``{"loss", "logits"}``."""

    def __init__(self, arch: str = "bert", frozen: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = ARCHS[arch][0]()
        self.model.get_input_embeddings().weight.requires_grad_(not frozen)

    def training_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def hf_callbacks(method: str) -> List[Any]:
    if method == "freelb":
        return [FreeLBCallback(adv_lr=0.3, adv_steps=2, adv_init_mag=0.0, adv_max_norm=0.2)]
    if method == "r3f":
        return [R3FCallback(eps=0.1, r3f_lambda=2.0, noise_type="normal"), BatchSeeded()]
    if method == "smart":
        return [SMARTCallback(adv_alpha=2.0, step_size=0.5, noise_var=0.1), BatchSeeded()]
    if method == "neftune":
        return [NEFTuneCallback(noise_alpha=5.0), BatchSeeded()]
    if method == "rdrop":
        return [RDropCallback(alpha=1.0)]
    if method == "vat":
        return [VATCallback(adv_alpha=2.0), BatchSeeded()]
    if method in ("sam", "asam"):
        return [SAMCallback(rho=0.5 if method == "asam" else 0.05, adaptive=method == "asam")]
    return []


def layer_fsdp(device: str, arch: str = "bert", **kwargs: Any) -> Any:
    wrap = ModuleWrapPolicy({_layer_class(ARCHS[arch][1])})  # one FSDP unit per layer, and the root
    return FSDPStrategy(auto_wrap_policy=wrap, **kwargs) if device == "cuda" else cpu_fsdp_strategy(auto_wrap_policy=wrap, **kwargs)


def hf_fit(arch: str, method: str, accumulate: int, frozen: bool, device: str, fsdp: bool,
           precision: str = "32-true") -> Dict[str, Any]:
    module, cbs = TinyTransformer(arch, frozen), hf_callbacks(method)
    embedding = module.model.get_input_embeddings().weight.detach().clone()
    trainer(accelerator=device, devices=1, deterministic=device == "cpu", strategy=layer_fsdp(device, arch) if fsdp else "auto",
            max_epochs=1, accumulate_grad_batches=accumulate, callbacks=cbs, precision=precision,
            use_distributed_sampler=False).fit(module, hf_batches("cls", 0, n=16))
    moved = float((module.model.get_input_embeddings().weight.detach().cpu() - embedding.cpu()).abs().max())
    return dict(weights=weights(module), attacks=[cb.attacks for cb in cbs if hasattr(cb, "attacks")], embedding_moved=moved)


#: name:architecture:method:accumulate:frozen embedding
HF_CONFIGS = [
    "bert_none_k2:bert:none:2:0", "bert_freelb_k2:bert:freelb:2:0", "bert_r3f_k2:bert:r3f:2:0", "bert_smart_k2:bert:smart:2:0",
    "gpt2_freelb_frozen:gpt2:freelb:2:1", "llama_r3f_frozen:llama:r3f:2:1", "llama_smart:llama:smart:2:0",
    "llama_neftune_frozen:llama:neftune:2:1", "bert_neftune_k2:bert:neftune:2:0",
    "bert_sam_k2:bert:sam:2:0", "llama_asam_frozen:llama:asam:2:1",
    "bertdrop_none_k2:bert_dropout:none:2:0", "bertdrop_rdrop_k2:bert_dropout:rdrop:2:0", "bert_vat_k2:bert:vat:2:0",
    "llama_vat_frozen:llama:vat:2:1",
]


BF16_CONFIGS = ["none_k2:none:1:2:bf16-mixed:0:0", "freelb2_k2:freelb:2:2:bf16-mixed:0:0", "r3f_k2:r3f:1:2:bf16-mixed:0:0",
                "neftune_k2:neftune:1:2:bf16-mixed:0:0", "sam_k2:sam:1:2:bf16-mixed:0:0"]  # SMART is refused with mixed precision under FSDP


def weights(module: Any) -> List[float]:
    return torch.cat([p.detach().float().cpu().reshape(-1) for p in module.model.parameters()]).tolist()


def fit(cfg: Dict[str, Any], device: str, fsdp: bool, precision: str = "32-true") -> Dict[str, Any]:
    strategy = (FSDPStrategy() if device == "cuda" else cpu_fsdp_strategy()) if fsdp else "auto"
    module = module_for(cfg, torch.float32, accumulate=cfg["accumulate"])
    cbs = callbacks_for(cfg)
    trainer(accelerator=device, devices=1, deterministic=device == "cpu", strategy=strategy, max_epochs=2, precision=precision,
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


class RobustBert(TinyTransformer):
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
            trainer(accelerator=device, devices=1, strategy=layer_fsdp(device), max_epochs=1, callbacks=cbs,
                    use_distributed_sampler=False).fit(module, hf_batches("cls", 0, n=8), hf_batches("cls", 0, n=4, seed=3))
        counts[name] = sum(p.numel() for p in module.model.parameters())
    return counts


def main(path: str, device: str) -> None:
    report: Dict[str, Any] = {}
    for config in CONFIGS:
        cfg = parse(config)
        report[cfg["name"]] = dict(single=fit(cfg, device, False), fsdp=fit(cfg, device, True))
    for config in BF16_CONFIGS:  # FSDP computes in bf16 parameters, autocast in float32 ones: compared, not equal
        report["bf16_" + parse(config)["name"]] = {strategy: fit(parse(config), device, strategy == "fsdp", "bf16-mixed")
                                                    for strategy in ("single", "fsdp")}
        report["bf16_" + parse(config)["name"]]["fp32"] = report[parse(config)["name"]]["single"] if parse(config)["name"] in report \
            else fit(parse(config), device, False)
    for config in HF_CONFIGS:
        name, arch, method, accumulate, frozen = config.split(":")
        report[name] = {strategy: hf_fit(arch, method, int(accumulate), frozen == "1", device, strategy == "fsdp")
                        for strategy in ("single", "fsdp")}
    # R-Drop in bf16 under FSDP (its dropout needs a model with dropout: the layer-wrapped BERT with dropout)
    report["bf16_bertdrop_rdrop_k2"] = {"fp32": report["bertdrop_rdrop_k2"]["single"],
                                        "fsdp": hf_fit("bert_dropout", "rdrop", 2, False, device, True, "bf16-mixed")}
    refused: Dict[str, str] = {"RobustAccuracy": robust_refused(device)}
    for make in (FGMCallback, AWPCallback, PGDCallback):
        try:
            strategy = FSDPStrategy() if device == "cuda" else cpu_fsdp_strategy()
            trainer(accelerator=device, devices=1, strategy=strategy, max_steps=1,
                    callbacks=[make()]).fit(module_for(parse("x:fgm:1:1:32-true:0:0"), torch.float32), loader(make_data(8)))
            refused[make.__name__] = "ran"
        except ValueError as err:
            refused[make.__name__] = str(err)
    try:  # SMART's ascent backward and FSDP's low-precision parameters (an H200 crash before this refusal)
        strategy = FSDPStrategy() if device == "cuda" else cpu_fsdp_strategy()
        trainer(accelerator=device, devices=1, strategy=strategy, max_steps=1, precision="bf16-mixed",
                callbacks=callbacks_for(parse("x:smart:1:1:32-true:0:0"))).fit(
            module_for(parse("x:smart:1:1:32-true:0:0"), torch.float32), loader(make_data(8)))
        refused["SMARTCallback_bf16"] = "ran"
    except ValueError as err:
        refused["SMARTCallback_bf16"] = str(err)
    report["refused"] = refused
    report["robust_lifted"] = robust_lifted(device)
    with open(path, "w") as f:
        json.dump(report, f)
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
