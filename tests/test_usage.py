"""The library used the way users use it: real ``transformers`` architectures built tiny from configs (no
downloads), PEFT/LoRA, lazily built models, batches as dicts/BatchEncoding, and the ordinary Lightning
callbacks alongside. Every fit is 2-3 steps."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from helpers import CLASSES, TextModule, TinyText, loader, make_data, trainer
from lightning_adv import AWPCallback, FGMCallback, FreeLBCallback, PGDCallback, in_adversarial_pass

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 100, 8, 4

# -- tiny transformers models ------------------------------------------------------------------------------------


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, pad_token_id=0))


def _roberta():
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ + 4, num_labels=2, pad_token_id=1))


def _deberta():
    return transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, pad_token_id=0))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0, tie_word_embeddings=True))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))


# name -> (build, task, pad id, emb_name for the weight-space methods, path of the input embedding)
ARCHS: Dict[str, tuple] = {
    "bert": (_bert, "cls", 0, "word_embeddings", "model.bert.embeddings.word_embeddings"),
    "roberta": (_roberta, "cls", 1, "word_embeddings", "model.roberta.embeddings.word_embeddings"),
    "deberta-v2": (_deberta, "cls", 0, "word_embeddings", "model.deberta.embeddings.word_embeddings"),
    "gpt2": (_gpt2, "lm", 0, "wte", "model.transformer.wte"),
    "t5": (_t5, "seq2seq", 0, "shared", "model.encoder.embed_tokens"),
    "llama": (_llama, "lm", 0, "embed_tokens", "model.model.embed_tokens"),
}


def hf_batches(task: str, pad: int, n: int = 12, seed: int = 0, encoding: bool = True) -> DataLoader:
    """``n`` examples, the last tokens of every other one padded, as dicts (or BatchEncoding) of tensors."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[::2, SEQ - 3:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    rows: List[Dict[str, torch.Tensor]] = []
    for i in range(n):
        row = {"input_ids": ids[i], "attention_mask": mask[i]}
        if task == "cls":
            row["labels"] = torch.tensor(i % 2)
        elif task == "lm":
            row["labels"] = ids[i].masked_fill(mask[i] == 0, -100)
        else:
            row["labels"] = torch.randint(2, VOCAB, (5,), generator=g)
        rows.append(row)

    def collate(items):
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return transformers.BatchEncoding(out) if encoding else out

    return DataLoader(rows, batch_size=BATCH, collate_fn=collate)


class HFModule(L.LightningModule):
    """Wraps a ``transformers`` model; the step returns the model's own loss. Records each pass's loss and, during
    adversarial passes, how far the named weight is from its value at the start of the batch."""

    def __init__(self, build: Callable[[], nn.Module], watch: Optional[str] = None, lr: float = 1e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build()
        self.lr = lr
        self.watch = watch
        self.losses: List[tuple] = []  # (adversarial?, loss)
        self.shifts: List[float] = []  # ||W - W_batch_start|| seen by the adversarial passes
        self._start: Optional[torch.Tensor] = None

    def watched(self) -> torch.Tensor:
        return self.get_parameter(self.watch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.watch is not None:
            self._start = self.watched().detach().clone()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        adv = in_adversarial_pass(self)
        self.losses.append((adv, float(out.loss.detach())))
        if adv and self._start is not None:
            self.shifts.append(float((self.watched().detach() - self._start).norm()))
        self.log("train_loss", out.loss, batch_size=BATCH)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class RestoredCheck(Callback):
    """After every attack (before the optimizer step), every parameter must equal its value at batch start."""

    def __init__(self) -> None:
        self.checked = 0
        self._saved: List[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._saved = [p.detach().clone() for p in pl_module.parameters()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        assert all(torch.equal(a, p) for a, p in zip(self._saved, pl_module.parameters())), "weights not restored"
        self.checked += 1


def params_of(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# -- 1. real architectures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_freelb_finds_the_input_embedding_of_real_architectures(arch):
    build, task, pad, _, path = ARCHS[arch]
    module = HFModule(build)
    emb = module.get_submodule(path)
    assert module.model.get_input_embeddings().weight is emb.weight  # T5 (transformers 5): `shared`, tied to it
    calls: List[torch.Tensor] = []
    emb.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    before, emb_before = params_of(module), emb.weight.detach().clone()
    cb = FreeLBCallback(adv_lr=0.1, adv_steps=2, adv_init_mag=0.6)
    trainer(max_steps=2, callbacks=[cb]).fit(module, hf_batches(task, pad, encoding=arch != "bert"))

    assert cb.method.target.path == path  # auto-found through get_input_embeddings()
    assert cb.attacks == 2 and cb.skipped == 0
    steps_run = len(module.losses)
    assert steps_run == 2 * 3 and sum(a for a, _ in module.losses) == 2 * 2  # clean + 2 ascent passes per step
    # one perturbed call per forward; a T5 decoder re-uses the shared embedding and is left alone
    assert cb.method.target.calls == steps_run
    assert len(calls) == steps_run
    after = params_of(module)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not torch.equal(emb_before, emb.weight) and len(changed) > 3
    # the adversarial passes see a different loss from the clean one
    clean = [x for a, x in module.losses if not a]
    adv = [x for a, x in module.losses if a]
    assert all(abs(a - clean[0]) > 1e-6 for a in adv[:2])


def test_freelb_perturbs_the_t5_encoder_input_only():
    module = HFModule(_t5)
    t5 = module.model
    seen: Dict[str, List[bool]] = {"encoder": [], "decoder": []}
    ids: Dict[str, torch.Tensor] = {}

    def remember(stack):
        def hook(m, args, kwargs):
            ids[stack] = kwargs.get("input_ids", args[0] if args else None)
        return hook

    def compare(stack):
        def hook(m, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            plain = nn.functional.embedding(ids[stack], t5.shared.weight)
            seen[stack].append(not torch.equal(hidden, plain))  # perturbed?
        return hook

    t5.encoder.register_forward_pre_hook(remember("encoder"), with_kwargs=True)
    t5.encoder.block[0].register_forward_pre_hook(compare("encoder"), with_kwargs=True)
    # the decoder gets labels shifted right as its input ids
    t5.decoder.register_forward_pre_hook(remember("decoder"), with_kwargs=True)
    t5.decoder.block[0].register_forward_pre_hook(compare("decoder"), with_kwargs=True)
    cb = FreeLBCallback(adv_lr=0.1, adv_steps=2, adv_init_mag=0.6)
    trainer(max_steps=2, callbacks=[cb]).fit(module, hf_batches("seq2seq", 0))
    assert cb.attacks == 2
    assert seen["encoder"] == [True] * 6 and seen["decoder"] == [False] * 6


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_weight_space_attacks_on_real_architectures_restore_the_weights(arch, method):
    build, task, pad, emb_name, path = ARCHS[arch]
    module = HFModule(build, watch=path + ".weight")
    emb_before = module.watched().detach().clone()
    if method == "fgm":
        cb = FGMCallback(epsilon=0.5, emb_name=emb_name)
    else:
        cb = PGDCallback(epsilon=0.5, alpha=0.3, steps=2, emb_name=emb_name)
    check = RestoredCheck()
    trainer(max_steps=2, callbacks=[cb, check]).fit(module, hf_batches(task, pad, encoding=arch != "gpt2"))

    assert cb.attacks == 2 and cb.skipped == 0 and check.checked == 2
    # a tied matrix (GPT-2 wte = lm_head, T5 shared = encoder/decoder/lm_head) is one parameter, perturbed once
    assert len(cb.method.parameters) == 1 and cb.method.parameters[0] is module.watched()
    if arch in ("gpt2", "t5"):
        assert module.model.lm_head.weight is module.watched()
    shifts = torch.tensor(module.shifts)
    if method == "fgm":  # ||epsilon * g / ||g|||| == epsilon, once per step
        assert len(shifts) == 2 and torch.allclose(shifts, torch.full((2,), 0.5), atol=1e-4)
    else:  # first pass alpha, then projected into the ball of radius epsilon
        assert len(shifts) == 4
        assert torch.allclose(shifts[::2], torch.full((2,), 0.3), atol=1e-4)
        assert bool((shifts[1::2] <= 0.5 + 1e-4).all()) and bool((shifts[1::2] > 0.3).all())
    assert not torch.equal(emb_before, module.watched())  # and training moved it
