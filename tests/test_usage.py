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

from helpers import TextModule, loader, make_data, trainer
from lightning_adv import AWPCallback, FGMCallback, FreeLBCallback, PGDCallback, in_adversarial_pass

transformers = pytest.importorskip("transformers")

# the modules here record every pass on purpose; the side-effect warning itself is tested below
pytestmark = pytest.mark.filterwarnings("ignore:lightning_adv. the adversarial passes re-ran:UserWarning")

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

    assert cb.method.target.module is emb  # auto-found through get_input_embeddings()
    assert cb.attacks == 2 and cb.skipped == 0
    steps_run = len(module.losses)
    assert steps_run == 2 * 3 and sum(a for a, _ in module.losses) == 2 * 2  # clean + 2 ascent passes per step
    # one perturbed call per forward (the T5 decoder embeds with its own module, tied to the same matrix)
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


# -- 2. PEFT / LoRA ----------------------------------------------------------------------------------------------


def _lora_bert():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    return peft.get_peft_model(_bert(), config)


def test_lora_trains_with_freelb_and_weight_space_attack_is_refused():
    module = HFModule(_lora_bert)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and not any("word_embeddings" in n for n in trainable)
    before = params_of(module)
    cb = FreeLBCallback(adv_lr=0.1, adv_steps=2)
    trainer(max_steps=2, callbacks=[cb]).fit(module, hf_batches("cls", 0))
    assert cb.attacks == 2 and cb.skipped == 0
    assert cb.method.target.path.endswith("bert.embeddings.word_embeddings") and cb.method.target.calls == 6
    after = params_of(module)
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora)
    frozen = [n for n in before if n not in trainable]
    assert len(frozen) > 10 and all(torch.equal(before[n], after[n]) for n in frozen)

    with pytest.raises(ValueError, match=r"FGMCallback: FGM\(emb_name='word_embeddings'\) matches only frozen parameters "
                                         r"\(requires_grad=False\): .*word_embeddings.*per example instead \(FreeLB"):
        trainer(max_steps=1, callbacks=[FGMCallback()]).fit(HFModule(_lora_bert), hf_batches("cls", 0))


# -- 3. models built late ----------------------------------------------------------------------------------------


class LateBert(HFModule):
    """The model is built in ``configure_model`` or in ``setup``, not in ``__init__``."""

    def __init__(self, where: str) -> None:
        super().__init__(lambda: None)
        self.where = where

    def _build(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            self.model = _bert()

    def configure_model(self) -> None:
        if self.where == "configure_model":
            self._build()

    def setup(self, stage: str) -> None:
        if self.where == "setup":
            self._build()


@pytest.mark.parametrize("where", ["configure_model", "setup"])
def test_model_built_late_is_attacked(where):
    module = LateBert(where)
    assert module.model is None
    fgm, freelb = FGMCallback(epsilon=0.5), FreeLBCallback(adv_steps=1)
    check = RestoredCheck()
    trainer(max_steps=2, callbacks=[fgm, freelb, check]).fit(module, hf_batches("cls", 0))
    assert fgm.attacks == 2 and freelb.attacks == 2 and check.checked == 2
    assert fgm.method.parameters[0] is module.model.bert.embeddings.word_embeddings.weight
    assert freelb.method.target.module is module.model.bert.embeddings.word_embeddings
    assert len(module.losses) == 2 * 3  # clean, FGM, FreeLB's ascent pass
    torch.manual_seed(0)
    assert not torch.equal(_bert().bert.embeddings.word_embeddings.weight, module.model.bert.embeddings.word_embeddings.weight)


# -- 4. zero magnitudes are plain training --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: FGMCallback(epsilon=0),
    lambda: PGDCallback(alpha=0),
    lambda: AWPCallback(adv_lr=0),
    lambda: FreeLBCallback(adv_lr=0, adv_init_mag=0, embedding="model.embeddings.word_embeddings"),
], ids=["fgm", "pgd", "awp", "freelb"])
def test_zero_magnitude_is_exactly_plain_training(make):
    plain = TextModule(dtype=torch.float64)
    trainer(max_steps=3).fit(plain, loader(make_data(12)))
    module, cb = TextModule(dtype=torch.float64), make()
    trainer(max_steps=3, callbacks=[cb]).fit(module, loader(make_data(12)))
    assert cb.attacks == 0 and module.steps_run == 3
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), module.parameters()))
    assert not torch.equal(next(iter(plain.parameters())), next(iter(TextModule(dtype=torch.float64).parameters())))


# -- 5. a step that mutates its batch ------------------------------------------------------------------------------


class Popping(HFModule):
    def training_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        logits = self.model(**batch).logits
        self.losses.append((in_adversarial_pass(self), labels))
        return nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("encoding", [False, True], ids=["dict", "BatchEncoding"])
def test_step_that_pops_labels_gets_them_in_every_pass(encoding):
    module = Popping(_bert)
    cbs = [FGMCallback(epsilon=0.5), PGDCallback(steps=2), AWPCallback(adv_param="classifier", adv_lr=0.5),
           FreeLBCallback(adv_steps=2)]
    trainer(max_steps=2, callbacks=cbs).fit(module, hf_batches("cls", 0, encoding=encoding))
    assert [cb.attacks for cb in cbs] == [2, 2, 2, 2] and all(cb.skipped == 0 for cb in cbs)
    per_step = 1 + 1 + 2 + 1 + 2
    assert len(module.losses) == 2 * per_step
    for step in range(2):
        passes = module.losses[step * per_step:(step + 1) * per_step]
        assert [a for a, _ in passes] == [False] + [True] * (per_step - 1)
        assert all(torch.equal(labels, passes[0][1]) for _, labels in passes)


# -- 6. a step that returns None in an adversarial pass ----------------------------------------------------------------


class SkipsSecondAttack(TextModule):
    def on_train_batch_start(self, batch, batch_idx):
        self.start = copy.deepcopy(self.model)

    def training_step(self, batch, batch_idx):
        if batch_idx == 1 and in_adversarial_pass(self):
            return None
        return super().training_step(batch, batch_idx)


class GradRecorder(Callback):
    def __init__(self) -> None:
        self.grads: List[List[torch.Tensor]] = []
        self.clean: List[List[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in pl_module.model.parameters()])
        start = pl_module.start  # the clean gradient of this batch, by hand
        ids, y = self.batch
        loss = nn.functional.cross_entropy(start(ids), y)
        self.clean.append([g.detach() for g in torch.autograd.grad(loss, list(start.parameters()))])


@pytest.mark.parametrize("make", [
    lambda: FGMCallback(epsilon=1.0),
    lambda: PGDCallback(steps=2),
    lambda: FreeLBCallback(adv_init_mag=0.0, embedding="model.embeddings.word_embeddings"),
], ids=["fgm", "pgd", "freelb"])
def test_none_from_an_adversarial_pass_skips_that_attack_only(make):
    module, cb, rec = SkipsSecondAttack(dtype=torch.float64), make(), GradRecorder()
    trainer(max_steps=3, callbacks=[cb, rec]).fit(module, loader(make_data(12)))
    assert module.trainer.global_step == 3
    assert cb.attacks == 3 and cb.skipped == 1
    same = [all(torch.allclose(g, c, rtol=0, atol=1e-12) for g, c in zip(gs, cs)) for gs, cs in zip(rec.grads, rec.clean)]
    assert same == [False, True, False]  # the skipped step trained on its clean gradient, exactly
    assert float(module.trainer.callback_metrics[f"adv/{cb.method.name}_skipped"]) == 1


def test_none_from_an_awp_pass_skips_the_micro_batch():
    """AWP computes its bounds in the clean gradient (no second gradient-sized buffer), so a skipped AWP pass leaves
    the micro-batch without gradient, as Lightning's own None does; training goes on."""
    module, cb, rec = SkipsSecondAttack(dtype=torch.float64), AWPCallback(adv_lr=0.5), GradRecorder()
    t = trainer(max_steps=3, callbacks=[cb, rec])
    t.fit(module, loader(make_data(12)))
    assert t.global_step == 3 and cb.attacks == 3 and cb.skipped == 1
    assert all(g is None for g in rec.grads[1]) and all(g is not None for g in rec.grads[0] + rec.grads[2])


# -- 7. dataloader_iter ------------------------------------------------------------------------------------------------


def test_dataloader_iter_step_is_refused_at_setup():
    class IterStep(TextModule):
        def training_step(self, dataloader_iter):
            ids, y = next(dataloader_iter)
            return nn.functional.cross_entropy(self.model(ids), y)

    with pytest.raises(ValueError, match=r"FGMCallback: IterStep\.training_step takes `dataloader_iter`.*"
                                         r"Take `batch, batch_idx` instead.*AdversarialMixin"):
        trainer(max_steps=1, callbacks=[FGMCallback()]).fit(IterStep(), loader(make_data(8)))


# -- 8. side effects in the step ------------------------------------------------------------------------------------


class Collecting(TextModule):
    def __init__(self, guarded: bool) -> None:
        super().__init__()
        self.guarded = guarded
        self.training_step_outputs: List[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.model(batch[0]), batch[1])
        if not (self.guarded and in_adversarial_pass(self)):
            self.training_step_outputs.append(loss.detach())
        return loss


def _adv_warnings(record) -> List[str]:
    return [str(w.message) for w in record if "lightning_adv: the adversarial passes" in str(w.message)]


def test_side_effect_in_the_step_is_warned_once_per_fit_and_guard_silences_it():
    module = Collecting(guarded=False)
    for fit in range(2):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer(max_steps=3, callbacks=[FGMCallback(), AWPCallback(adv_lr=0.5)]).fit(module, loader(make_data(12)))
        found = _adv_warnings(record)
        assert len(found) == 1 and "changed self.training_step_outputs again" in found[0]
        assert "in_adversarial_pass(self)" in found[0]
    assert len(module.training_step_outputs) == 2 * 3 * 3  # what the warning is about: 3 appends per batch

    module = Collecting(guarded=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=[FGMCallback(), AWPCallback(adv_lr=0.5)]).fit(module, loader(make_data(12)))
    assert _adv_warnings(record) == [] and len(module.training_step_outputs) == 3


# -- 9. two callbacks of one class ----------------------------------------------------------------------------------


def test_two_fgm_callbacks_with_different_targets_run_and_resume(tmp_path):
    data = hf_batches("cls", 0, n=8)  # 2 batches an epoch
    words = FGMCallback(epsilon=0.5, emb_name="word_embeddings")
    positions = FGMCallback(epsilon=0.2, emb_name="position_embeddings", start_epoch=1)
    assert words.state_key != positions.state_key
    module = HFModule(_bert)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer(max_steps=3, callbacks=[words, positions, ckpt], enable_checkpointing=True).fit(module, data)
    assert (words.attacks, positions.attacks) == (3, 1)
    assert len(module.losses) == 2 * 2 + 3  # epoch 0: one attack a step; epoch 1: two
    assert [n for n, _ in positions.method.named_params] == ["model.bert.embeddings.position_embeddings.weight"]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[words.state_key] == {"attacks": 3, "skipped": 0}
    assert saved[positions.state_key] == {"attacks": 1, "skipped": 0}

    words2 = FGMCallback(epsilon=0.5, emb_name="word_embeddings")
    positions2 = FGMCallback(epsilon=0.2, emb_name="position_embeddings", start_epoch=1)
    trainer(max_steps=4, callbacks=[positions2, words2]).fit(HFModule(_bert), data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert (words2.attacks, positions2.attacks) == (4, 2)


def test_two_callbacks_on_the_same_target_are_refused():
    # given to the Trainer: Lightning itself refuses two callbacks with one state_key, at construction
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `FGMCallback`.*state_key` must be unique"):
        trainer(max_steps=1, callbacks=[FGMCallback(epsilon=0.5), FGMCallback(epsilon=1.0)])
    # added later (trainer.callbacks is a plain list): refused at setup, naming the target
    t = trainer(max_steps=1, callbacks=[FGMCallback(epsilon=0.5)])
    t.callbacks.append(FGMCallback(epsilon=1.0))
    with pytest.raises(ValueError, match=r"FGMCallback: two callbacks attack the same target \(FGMCallback\{'emb_name': "
                                         r"'word_embeddings'\}\); keep one of them"):
        t.fit(TextModule(), loader(make_data(8)))
    # the same parameter through two classes is allowed: the state keys differ
    fgm, pgd = FGMCallback(), PGDCallback(steps=1)
    trainer(max_steps=1, callbacks=[fgm, pgd]).fit(TextModule(), loader(make_data(8)))
    assert fgm.state_key != pgd.state_key and (fgm.attacks, pgd.attacks) == (1, 1)


# -- 10. sparse embeddings -------------------------------------------------------------------------------------------


class SparseText(TextModule):
    def __init__(self) -> None:
        super().__init__()
        emb = self.model.embeddings.word_embeddings
        self.model.embeddings.word_embeddings = nn.Embedding(emb.num_embeddings, emb.embedding_dim, sparse=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("make", [lambda: FGMCallback(), lambda: PGDCallback()], ids=["fgm", "pgd"])
def test_sparse_embedding_is_refused_by_weight_space_attacks(make):
    cb = make()
    with pytest.raises(ValueError, match=rf"{type(cb).__name__}: .*model\.embeddings\.word_embeddings\.weight of an "
                                         r"nn\.Embedding\(sparse=True\).*sparse=False.*\(FreeLB"):
        trainer(max_steps=1, callbacks=[cb]).fit(SparseText(), loader(make_data(8)))


def test_sparse_embedding_trains_with_freelb():
    module = SparseText()
    before = params_of(module)
    cb = FreeLBCallback(adv_steps=2, embedding="model.embeddings.word_embeddings")
    trainer(max_steps=2, callbacks=[cb]).fit(module, loader(make_data(8)))
    assert cb.attacks == 2 and cb.skipped == 0 and module.steps_run == 6
    after = params_of(module)
    assert all(not torch.equal(before[n], after[n]) for n in before)


# -- 11. empty name patterns ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,owner,arg", [
    (lambda v: FGMCallback(emb_name=v), "FGMCallback", "emb_name"),
    (lambda v: PGDCallback(emb_name=v), "PGDCallback", "emb_name"),
    (lambda v: AWPCallback(adv_param=v), "AWPCallback", "adv_param"),
])
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_name_pattern_is_rejected_at_construction(make, owner, arg, value):
    with pytest.raises(ValueError, match=rf"{owner}\({arg}='{value}'\): {arg} must be a non-empty substring"):
        make(value)


# -- 12. alongside the usual callbacks ---------------------------------------------------------------------------------


class WithVal(TextModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.model(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def test_usual_callbacks_work_alongside(tmp_path):
    module = WithVal()
    fgm = FGMCallback(epsilon=0.5)
    stop = EarlyStopping(monitor="val_loss", stopping_threshold=1e9)  # always "reached": stops after epoch 0
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    lr = LearningRateMonitor(logging_interval="epoch")
    t = trainer(max_epochs=5, callbacks=[fgm, stop, ckpt, lr], enable_checkpointing=True,
                logger=CSVLogger(tmp_path), limit_val_batches=1)
    t.fit(module, loader(make_data(8)), loader(make_data(4, seed=1)))
    assert t.should_stop and t.current_epoch == 1 and fgm.attacks == 2
    assert ckpt.best_model_path and torch.load(ckpt.best_model_path, weights_only=False)["callbacks"][fgm.state_key] == {
        "attacks": 2, "skipped": 0}
    assert float(t.callback_metrics["lr-SGD"]) == pytest.approx(0.1)


def test_gradient_clipping_applies_to_the_merged_gradient():
    class Recorder(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before Lightning clips
            self.grad = [p.grad.detach().clone() for p in pl_module.parameters()]
            self.before = [p.detach().clone() for p in pl_module.parameters()]

    class Plain(TextModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module, rec, cb = Plain(dtype=torch.float64), Recorder(), FGMCallback(epsilon=2.0)
    trainer(max_steps=1, callbacks=[cb, rec], gradient_clip_val=1e-3).fit(module, loader(make_data(4)))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in rec.grad]))
    assert cb.attacks == 1 and float(norm) > 1e-3
    for g, w0, w in zip(rec.grad, rec.before, module.parameters()):
        assert torch.allclose(w0 - w.detach(), 0.1 * g * (1e-3 / norm), rtol=1e-6, atol=1e-12)
