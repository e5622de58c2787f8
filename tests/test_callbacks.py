"""Behaviour of the callbacks beyond the arithmetic: isolation, safety, errors, resume, real models."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import LogitsText, TextModule, loader, make_data, trainer
from lightning_adv import AWP, FGM, AWPCallback, FGMCallback, FreeLBCallback, PGDCallback, R3FCallback, SMARTCallback, in_adversarial_pass
from lightning_adv import MomentumSAMCallback, RDropCallback, SAMCallback, VATCallback


@pytest.mark.parametrize("cb", [FGMCallback(epsilon=2.0), AWPCallback(adv_lr=1.0, adv_eps=0.3)])
def test_logging_and_metrics_see_only_clean_passes(cb):
    module = TextModule()
    trainer(max_epochs=1, callbacks=[cb]).fit(module, loader(make_data(16)))
    metrics = trainer_metrics = module.trainer.callback_metrics
    clean = torch.tensor(module.clean_losses)
    assert module.steps_run == 8  # 4 clean + 4 adversarial runs of training_step
    assert len(clean) == 4
    assert torch.allclose(trainer_metrics["train_loss_epoch"], clean.mean(), atol=1e-6)
    assert torch.allclose(metrics["train_loss_step"], clean[-1], atol=1e-6)
    assert module.update_counts == [1, 2, 3, 4]
    # the adversarial loss is logged separately, and differs from the clean one
    name = f"adv/{cb.method.name}"
    assert float(metrics[f"{name}_attacks"]) == 4 and float(metrics[f"{name}_skipped"]) == 0
    assert float(metrics[f"{name}_loss_epoch"]) > float(clean.mean())


def test_metric_accuracy_equals_clean_predictions():
    class Recording(TextModule):
        def on_fit_start(self):
            self.correct = []

        def training_step(self, batch, batch_idx):
            if not in_adversarial_pass(self):
                self.correct.append((self.model(batch[0]).argmax(-1) == batch[1]).float())
            return super().training_step(batch, batch_idx)

    module = Recording()
    trainer(max_epochs=1, callbacks=[FGMCallback(epsilon=3.0)]).fit(module, loader(make_data(16)))
    expected = torch.cat(module.correct).mean()
    assert torch.allclose(module.trainer.callback_metrics["train_acc_epoch"], expected)


class BNModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.bn(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batchnorm_running_statistics_untouched_by_adversarial_pass():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(24, 6, generator=g) * 3 + 1, torch.randint(0, 2, (24,), generator=g))
    module = BNModule()
    trainer(max_epochs=1, callbacks=[AWPCallback(adv_lr=1.0, adv_eps=0.5, adv_step=2)]).fit(module, DataLoader(ds, batch_size=6))
    expected = nn.BatchNorm1d(6)  # BN statistics depend on the inputs only: replay the clean passes
    for x, _ in DataLoader(ds, batch_size=6):
        expected(x)
    assert int(module.bn.num_batches_tracked) == 4
    assert torch.allclose(module.bn.running_mean, expected.running_mean)
    assert torch.allclose(module.bn.running_var, expected.running_var)


class Exploding(TextModule):
    def training_step(self, batch, batch_idx):
        if in_adversarial_pass(self):
            self.seen_perturbed = [p.detach().clone() for p in self.model.parameters()]
            raise RuntimeError("boom in the adversarial pass")
        self.before = [p.detach().clone() for p in self.model.parameters()]
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("cb", [FGMCallback(epsilon=1.0), AWPCallback(adv_lr=1.0, adv_step=2)])
def test_weights_restored_when_the_adversarial_pass_raises(cb):
    module = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=1, callbacks=[cb]).fit(module, loader(make_data(8)))
    after = list(module.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(module.seen_perturbed, module.before))  # it was perturbed
    assert all(torch.equal(a, b) for a, b in zip(after, module.before))  # and restored


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: FGMCallback(epsilon=-1.0), r"FGMCallback\(epsilon=-1.0\): epsilon must be a finite number >= 0"),
        (lambda: FGMCallback(epsilon=float("nan")), r"epsilon must be a finite number"),
        (lambda: FGMCallback(start_epoch=-1), r"FGMCallback\(start_epoch=-1\): start_epoch must be an integer >= 0"),
        (lambda: AWPCallback(adv_lr=-0.1), r"AWPCallback\(adv_lr=-0.1\): adv_lr must be"),
        (lambda: AWPCallback(adv_eps=-0.2), r"AWPCallback\(adv_eps=-0.2\): adv_eps must be"),
        (lambda: AWPCallback(adv_step=0), r"AWPCallback\(adv_step=0\): adv_step must be an integer >= 1"),
        (lambda: AWPCallback(start_epoch=-2), r"start_epoch must be an integer >= 0"),
    ],
)
def test_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unmatched_embedding_name_lists_candidates_at_setup():
    with pytest.raises(ValueError, match=r"FGMCallback: FGM\(emb_name='word_embedding_typo'\) matches no trainable parameter.*model\.embeddings\.word_embeddings\.weight"):
        trainer(max_steps=1, callbacks=[FGMCallback(emb_name="word_embedding_typo")]).fit(TextModule(), loader(make_data(8)))


def test_frozen_match_is_reported():
    module = TextModule()
    module.model.embeddings.word_embeddings.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"matches only frozen parameters.*word_embeddings"):
        trainer(max_steps=1, callbacks=[FGMCallback()]).fit(module, loader(make_data(8)))
    with pytest.raises(ValueError, match=r"AWPCallback: AWP\(adv_param='nothing'\) matches no trainable"):
        trainer(max_steps=1, callbacks=[AWPCallback(adv_param="nothing")]).fit(TextModule(), loader(make_data(8)))


def _fake_trainer(strategy):
    class T:
        callbacks: list = []

    t = T()
    t.strategy = strategy
    return t


def test_deepspeed_refused_at_setup():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    made = object.__new__(DeepSpeedStrategy)  # DeepSpeed is not installed here: an instance of the class, never set up
    for cb in (FGMCallback(), FreeLBCallback()):
        with pytest.raises(ValueError, match=r"does not support the strategy DeepSpeedStrategy.*Supported: single device"):
            cb.setup(_fake_trainer(made), TextModule(), "fit")


def _fake_trainer_of(strategy, world_size=1, accumulate=1):
    t = _fake_trainer(strategy)
    t.world_size, t.accumulate_grad_batches = world_size, accumulate
    return t


@pytest.mark.parametrize("make", [FGMCallback, AWPCallback, PGDCallback])
def test_fsdp_refused_for_weight_space_methods_with_the_reason(make):
    """tests/test_fsdp.py checks the same with Lightning's FSDPStrategy running (on CPU), test_cuda.py on a GPU."""
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match=r"does not support FSDPStrategy: it perturbs weights along the whole gradient.*"
                                         r"Use FreeLBCallback, R3FCallback or SMARTCallback"):
        make().setup(_fake_trainer_of(FSDPStrategy()), TextModule(), "fit")


def test_fsdp_rdrop_runs_as_r3f_and_vat_as_smart():
    """R-Drop joins the clean backward as R3F does; VAT's ascent is SMART's: the same FSDP rules (tests/test_fsdp.py)."""
    from lightning.pytorch.strategies import FSDPStrategy

    RDropCallback().setup(_fake_trainer_of(FSDPStrategy(), world_size=2, accumulate=2), TextModule(), "fit")
    VATCallback().setup(_fake_trainer_of(FSDPStrategy(), world_size=2), TextModule(), "fit")
    VATCallback().setup(_fake_trainer_of(FSDPStrategy(), accumulate=2), TextModule(), "fit")
    with pytest.raises(ValueError, match=r"VATCallback under FSDPStrategy with several processes \(world_size=2\) needs"):
        VATCallback().setup(_fake_trainer_of(FSDPStrategy(), world_size=2, accumulate=2), TextModule(), "fit")
    bf16 = _fake_trainer_of(FSDPStrategy())
    bf16.precision = "bf16-mixed"
    with pytest.raises(ValueError, match=r"VATCallback under FSDPStrategy needs precision='32-true'"):
        VATCallback().setup(bf16, TextModule(), "fit")


def test_fsdp_with_several_processes_and_accumulation_refused_for_smart():
    from lightning.pytorch.strategies import FSDPStrategy

    SMARTCallback().setup(_fake_trainer_of(FSDPStrategy(), world_size=2), TextModule(), "fit")
    SMARTCallback().setup(_fake_trainer_of(FSDPStrategy(), accumulate=4), TextModule(), "fit")
    with pytest.raises(ValueError, match=r"world_size=2\) needs accumulate_grad_batches=1 \(got 4\).*FreeLBCallback or R3F"):
        SMARTCallback().setup(_fake_trainer_of(FSDPStrategy(), world_size=2, accumulate=4), TextModule(), "fit")
    for make in (FreeLBCallback, R3FCallback):
        make().setup(_fake_trainer_of(FSDPStrategy(), world_size=2, accumulate=4), TextModule(), "fit")


def test_fsdp_sam_accepted_where_its_norm_is_right_and_refused_elsewhere():
    from lightning.pytorch.strategies import FSDPStrategy

    for strategy in (FSDPStrategy(), FSDPStrategy(sharding_strategy="NO_SHARD"), FSDPStrategy(sharding_strategy="SHARD_GRAD_OP")):
        SAMCallback().setup(_fake_trainer_of(strategy, world_size=2), TextModule(), "fit")
        SAMCallback(adaptive=True).setup(_fake_trainer_of(strategy, accumulate=4), TextModule(), "fit")
    with pytest.raises(ValueError, match=r"SAMCallback under FSDPStrategy with several processes \(world_size=2\) needs "
                                         r"accumulate_grad_batches=1 \(got 2\)"):
        SAMCallback().setup(_fake_trainer_of(FSDPStrategy(), world_size=2, accumulate=2), TextModule(), "fit")
    with pytest.raises(ValueError, match=r"sharding_strategy='HYBRID_SHARD'\) is not supported: the gradient norm would be "
                                         r"summed over replicas"):
        hybrid = FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={torch.nn.Linear})
        SAMCallback().setup(_fake_trainer_of(hybrid, world_size=2), TextModule(), "fit")
    MomentumSAMCallback().setup(_fake_trainer_of(FSDPStrategy(), world_size=2, accumulate=2), TextModule(), "fit")


def test_checkpoint_resume_keeps_counters(tmp_path):
    ds = make_data(16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = FGMCallback(epsilon=0.5)
    trainer(max_steps=3, callbacks=[first, ckpt], enable_checkpointing=True).fit(TextModule(), loader(ds))
    assert first.attacks == 3
    second = FGMCallback(epsilon=0.9)  # a changed hyperparameter must not lose the state
    assert second.state_key == first.state_key
    trainer(max_steps=6, callbacks=[second, ModelCheckpoint(dirpath=tmp_path)], enable_checkpointing=True).fit(
        TextModule(), loader(ds), ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.attacks == 6 and second.state_dict() == {"attacks": 6, "skipped": 0}


def test_fp16_overflow_skips_the_attack_and_counts_it():
    class Overflowing(TextModule):
        def training_step(self, batch, batch_idx):
            logits = self.model(batch[0]) * 3e4  # fp16 logits overflow: non-finite gradients
            return nn.functional.cross_entropy(logits, batch[1])

    module = Overflowing()
    cb = FGMCallback()
    trainer(max_steps=2, callbacks=[cb], plugins=[MixedPrecision("16-mixed", "cpu")]).fit(module, loader(make_data(8)))
    assert cb.attacks == 2 and cb.skipped == 2


def test_core_skip_leaves_weights_unperturbed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    for attack in (FGM(model, emb_name="0.weight"), AWP(model, adv_lr=1.0)):
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.full_like(p, float("inf"))
        seen = []

        def closure():
            seen.append([p.detach().clone() for p in model.parameters()])
            return model(torch.tensor([[1, 2]])).sum()

        attack.attack_backward(closure)
        assert all(torch.equal(a, b) for a, b in zip(seen[0], before))
        assert bool(attack.last_skipped)


def test_adversarial_loss_hook_is_used_and_training_step_not_rerun():
    class WithHook(TextModule):
        hook_calls = 0

        def adversarial_loss(self, batch, batch_idx):
            self.hook_calls += 1
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    module = WithHook()
    trainer(max_epochs=1, callbacks=[FGMCallback()]).fit(module, loader(make_data(16)))
    assert module.hook_calls == 4 and module.steps_run == 4


def test_manual_optimization_module_is_not_rerun_and_warned():
    class Manual(TextModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.steps_run += 1
            self.manual_backward(nn.functional.cross_entropy(self.model(batch[0]), batch[1]))
            opt.step()

    module = Manual()
    with pytest.warns(UserWarning, match="manual optimization.*adversarial_backward") as record:
        trainer(max_epochs=1, callbacks=[FGMCallback()]).fit(module, loader(make_data(16)))
    assert module.steps_run == 4 and module.trainer.global_step == 4
    assert sum("adversarial_backward" in str(w.message) for w in record) == 1


def test_tied_embeddings_matched_once_under_either_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(10, 4)
            self.decoder = nn.Linear(4, 10, bias=False)
            self.decoder.weight = self.word_embeddings.weight

    model = Tied()
    assert len(FGM(model, emb_name="decoder").parameters) == 1
    assert len(AWP(model, adv_param="weight").parameters) == 1


def test_tiny_random_bert_trains_with_both_callbacks():
    from transformers import BertConfig, BertForSequenceClassification

    class Bert(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=16, num_labels=2)
            self.model = BertForSequenceClassification(cfg)

        def training_step(self, batch, batch_idx):
            ids, y = batch
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y)
            self.log("loss", out.loss)
            return out.loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randint(0, 60, (16, 8), generator=g), torch.randint(0, 2, (16,), generator=g))
    module = Bert()
    before = copy.deepcopy(module.model.bert.embeddings.word_embeddings.weight.detach())
    fgm, awp = FGMCallback(epsilon=1.0), AWPCallback(adv_lr=0.5, adv_eps=0.01)
    trainer(max_epochs=1, callbacks=[fgm, awp], precision="bf16-mixed").fit(module, DataLoader(ds, batch_size=4))
    metrics = module.trainer.callback_metrics
    assert fgm.attacks == 4 and awp.attacks == 4
    assert torch.isfinite(metrics["adv/fgm_loss_epoch"]) and torch.isfinite(metrics["adv/awp_loss_epoch"])
    assert not torch.equal(before, module.model.bert.embeddings.word_embeddings.weight)


def test_fsdp_refuses_hidden_parameters():
    """FreeLB, R3F and SMART pass setup with Lightning's default FSDPStrategy and stop at use_orig_params=False,
    which hides the module's parameters."""
    from lightning.pytorch.strategies import FSDPStrategy

    for make in (FreeLBCallback, R3FCallback, SMARTCallback):
        make().setup(_fake_trainer_of(FSDPStrategy()), TextModule(), "fit")
        with pytest.raises(ValueError, match=r"needs FSDPStrategy\(use_orig_params=True\)"):
            make().setup(_fake_trainer_of(FSDPStrategy(use_orig_params=False)), TextModule(), "fit")


# -- what a new user trips over (issue 21) ------------------------------------------------------------------------------
def _fit_warnings(module, callbacks, **kwargs):
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=callbacks, **{"max_epochs": 1, **kwargs}).fit(module, loader(make_data(16)))
    return [str(w.message) for w in record if "lightning_adv" in str(w.message) or "never attack" in str(w.message)]


class EvalText(TextModule):
    """A model left in eval mode, as transformers' from_pretrained returns it."""

    def __init__(self, fix_in_on_fit_start: bool = False):
        super().__init__()
        self.model.eval()
        self.fix = fix_in_on_fit_start

    def on_fit_start(self):
        if self.fix:
            self.model.train()


def test_model_in_eval_mode_is_warned_once_with_the_fix():
    emb = "model.embeddings.word_embeddings"
    messages = _fit_warnings(EvalText(), [FGMCallback(), FreeLBCallback(embedding=emb)])
    eval_mode = [m for m in messages if "eval mode" in m]
    assert len(eval_mode) == 1, messages  # once per fit, for all callbacks
    assert "self.model (TinyText, attacked by FGMCallback, FreeLBCallback) is in eval mode" in eval_mode[0]
    assert "Call `self.model.train()` after loading the model" in eval_mode[0]
    # the fix in the module's on_fit_start (it runs after the callbacks' on_fit_start) is seen: no warning
    assert not [m for m in _fit_warnings(EvalText(fix_in_on_fit_start=True), [FGMCallback()]) if "eval mode" in m]
    assert not [m for m in _fit_warnings(LogitsText(), [R3FCallback(embedding=emb)]) if "eval mode" in m]


def test_only_the_attacked_part_is_checked():
    class HeadInEval(TextModule):
        def on_fit_start(self):
            self.model.head.eval()  # not on the way to the embedding

    assert not [m for m in _fit_warnings(HeadInEval(), [FGMCallback()]) if "eval mode" in m]
    class EmbeddingsInEval(TextModule):
        def on_fit_start(self):
            self.model.embeddings.eval()

    (message,) = [m for m in _fit_warnings(EmbeddingsInEval(), [FGMCallback()]) if "eval mode" in m]
    assert "self.model.embeddings (Module, attacked by FGMCallback)" in message and "`self.model.embeddings.train()`" in message


@pytest.mark.parametrize(
    "make, limits, expected",
    [
        (lambda: FGMCallback(start_epoch=1), dict(max_epochs=1), "FGMCallback(start_epoch=1) will never attack: this fit ends after max_epochs=1 (epochs 0, counted from 0)"),
        (lambda: FreeLBCallback(start_epoch=3, embedding="model.embeddings.word_embeddings"), dict(max_epochs=2), "max_epochs=2 (epochs 0 to 1"),
        (lambda: AWPCallback(start_step=3), dict(max_steps=3), "AWPCallback(start_step=3) will never attack: this fit ends after max_steps=3 (steps 0 to 2"),
        (lambda: AWPCallback(start_step=8), dict(max_epochs=2), "AWPCallback(start_step=8) will never attack: this fit ends after 8 optimizer steps"),
    ],
)
def test_an_attack_that_can_never_run_is_warned(make, limits, expected):
    cb = make()
    messages = _fit_warnings(TextModule(), [cb], **limits)
    never = [m for m in messages if "never attack" in m]
    assert len(never) == 1 and expected in never[0], messages
    assert cb.attacks == 0


def test_an_attack_that_runs_late_is_not_warned():
    cb = AWPCallback(start_step=7, adv_eps=0.01)
    assert not [m for m in _fit_warnings(TextModule(), [cb], max_epochs=2) if "never attack" in m]
    assert cb.attacks == 1  # 8 steps (2 epochs of 4), step 7 attacked


def _rendered(bar) -> str:
    """What the bar shows after its last update (tqdm's postfix; Rich's metrics column)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    if isinstance(bar, TQDMProgressBar):
        return bar.train_progress_bar.postfix
    return " ".join(bar._metric_component._generate_metrics_texts())


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_progress_bar_shows_small_adversarial_losses_readably(kind):
    """Lightning's bars print three decimals (Rich: `.3f`): a divergence of 1e-7 showed as 0.000 (issue 21, point 2)."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    bar = TQDMProgressBar() if kind == "tqdm" else RichProgressBar()
    seen = []

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shown = trainer.progress_bar_callback.get_metrics(trainer, pl_module)
            seen.append((trainer.progress_bar_metrics["adv/r3f_loss"], shown["adv/r3f_loss"], shown["tiny"],
                         _rendered(trainer.progress_bar_callback)))

    class Tiny(LogitsText):
        def training_step(self, batch, batch_idx):
            self.log("tiny", 1e-7, prog_bar=True)  # a key of the module's own
            return super().training_step(batch, batch_idx)

    module = Tiny()
    t = trainer(callbacks=[R3FCallback(eps=1e-2, embedding="model.embeddings.word_embeddings"), bar, Look()],
                enable_progress_bar=True, max_epochs=1)
    t.fit(module, loader(make_data(16)))
    assert len(seen) == 4
    for value, shown, tiny, rendered in seen:
        assert 0 < value < 1e-3 and isinstance(value, float)  # the value itself is unchanged
        assert shown == f"{value:.2e}" and "e-" in shown  # e.g. '3.41e-07'
        assert isinstance(tiny, float) and tiny == pytest.approx(1e-7)  # the module's own keys are left to the bar
        assert f"adv/r3f_loss{'=' if kind == 'tqdm' else ': '}{shown}" in rendered, rendered
    assert "get_metrics" not in vars(t.progress_bar_callback)  # the bar's own get_metrics back after fit


# -- the attack's own size (issue 21, point 10) -------------------------------------------------------------------------
EMB_PATH = "model.embeddings.word_embeddings"


class FirstStep(L.Callback):
    """The step values of the attack-size keys after the first micro-batch."""

    def __init__(self):
        self.values = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.values:
            self.values = {k: v.clone() for k, v in trainer.callback_metrics.items() if k.endswith(("_grad_norm", "_delta_norm"))}
            self.bar = set(trainer.progress_bar_metrics)


def _clean_grad_norm(module, names):
    ids, y = next(iter(loader(make_data(16))))
    model = copy.deepcopy(module.model)
    nn.functional.cross_entropy(model(ids), y).backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for n, p in model.named_parameters() if any(s in n for s in names)])))


@pytest.mark.parametrize(
    "make, key, names",
    [
        (lambda: FGMCallback(epsilon=0.5), "adv/fgm_grad_norm", ["word_embeddings"]),
        (lambda: PGDCallback(epsilon=0.5, alpha=0.2, steps=2), "adv/pgd_grad_norm", ["word_embeddings"]),
        (lambda: AWPCallback(adv_eps=0.01), "adv/awp_grad_norm", ["weight"]),
    ],
)
def test_weight_space_methods_log_the_clean_gradient_norm(make, key, names, tmp_path):
    module, look = TextModule(), FirstStep()
    expected = _clean_grad_norm(module, names)
    from lightning.pytorch.loggers import CSVLogger

    t = trainer(callbacks=[make(), look], logger=CSVLogger(tmp_path), log_every_n_steps=1, max_epochs=1)
    t.fit(module, loader(make_data(16)))
    assert float(look.values[key]) == pytest.approx(expected, rel=1e-5)
    assert key not in look.bar  # off the progress bar
    import csv

    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    assert len(rows) == 4 and float(rows[0][key]) == pytest.approx(expected, rel=1e-5)  # every step, to the logger


def test_gradient_norm_has_the_grad_scaler_scale_removed():
    expected = _clean_grad_norm(TextModule(), ["word_embeddings"])
    look = FirstStep()
    t = trainer(callbacks=[FGMCallback(epsilon=0.5), look], plugins=[MixedPrecision("16-mixed", "cpu")], max_epochs=1)
    t.fit(TextModule(), loader(make_data(16)))
    assert t.precision_plugin.scaler.get_scale() == 65536.0
    assert float(look.values["adv/fgm_grad_norm"]) == pytest.approx(expected, rel=1e-2)  # fp16, not 65536 times larger


@pytest.mark.parametrize(
    "make, key, expected",
    [
        # FreeLB from delta0 = 0 with one ascent step: delta = adv_lr * g / ||g|| per example, so every norm is adv_lr
        (lambda: FreeLBCallback(adv_lr=0.3, adv_steps=1, adv_init_mag=0.0, embedding=EMB_PATH), "adv/freelb_delta_norm", lambda v: v == pytest.approx(0.3, rel=1e-5)),
        # SMART, norm l2: each of the 5 tokens normalised to norm 1 (the guard made negligible): sqrt(5) per example
        (lambda: SMARTCallback(norm="l2", noise_var=1e-2, epsilon=1e-12, embedding=EMB_PATH), "adv/smart_delta_norm", lambda v: v == pytest.approx(5 ** 0.5, rel=1e-4)),
        # R3F, uniform noise in [-eps, eps] on 5 tokens x 8 hidden: 0 < norm <= eps * sqrt(40), about eps * sqrt(40 / 3)
        (lambda: R3FCallback(eps=1e-3, embedding=EMB_PATH), "adv/r3f_delta_norm", lambda v: 0.5e-3 * (40 / 3) ** 0.5 < v <= 1e-3 * 40 ** 0.5),
    ],
)
def test_embedding_output_methods_log_the_perturbation_norm(make, key, expected):
    look = FirstStep()
    trainer(callbacks=[make(), look], max_epochs=1).fit(LogitsText(), loader(make_data(16)))
    value = float(look.values[key])
    assert expected(value), value
    assert key not in look.bar
