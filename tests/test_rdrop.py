"""R-Drop: float64 equality with a plain loop written from dropreg/R-Drop (two forwards with dropout,
``0.5 * (CE1 + CE2) + alpha * compute_kl_loss(logits1, logits2)``, the KL summed), with the dropout masks drawn from
the same seeded generator on both sides; the eval-mode warning, argument checks and composition."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import CLASSES, DIM, VOCAB, loader, make_data, trainer
from lightning_adv import AdversarialMixin, R3FCallback, RDropCallback
from lightning_adv.core import RDrop, adversarial_backward


class SeededDropout(nn.Dropout):
    """nn.Dropout drawing its masks from its own generator: the reference draws the same masks in the same order."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__(p)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (torch.rand(x.shape, generator=self.generator, dtype=x.dtype) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class DropText(nn.Module):
    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.drop = SeededDropout(0.3, seed)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings.word_embeddings(ids).mean(dim=1)
        return self.head(self.drop(torch.tanh(self.hidden(h))))


def make_model() -> DropText:
    torch.manual_seed(0)
    return DropText().double()


# -- the reference, from dropreg/R-Drop (README / huggingface_transformer_src: compute_kl_loss) ------------------------


def compute_kl_loss(p, q):
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none").sum()
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none").sum()
    return (p_loss + q_loss) / 2


def reference_loss(model, ids, y, alpha):
    logits = model(ids)
    logits2 = model(ids)  # keep dropout and forward twice
    ce_loss = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits2, y))
    return ce_loss + alpha * compute_kl_loss(logits, logits2)


def reference_training(data, alpha, accumulate):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (ids, y) in enumerate(data):
        (reference_loss(model, ids, y, alpha) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


class DropModule(L.LightningModule):
    def __init__(self, eval_mode: bool = False):
        super().__init__()
        self.model = make_model()
        if eval_mode:
            self.model.eval()

    def training_step(self, batch, batch_idx):
        ids, y = batch
        logits = self.model(ids)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ManualDrop(AdversarialMixin, DropModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        ids, y = batch

        def loss_fn():
            logits = self.model(ids)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

        self.adversarial_backward(loss_fn)
        opt.step()
        opt.zero_grad()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# -- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_core_equals_r_drop_source_in_float64(alpha):
    """One micro-batch with torch's own nn.Dropout (global RNG reseeded on both sides): equal gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.4), nn.Linear(16, 4)).double()
    ref = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.4), nn.Linear(16, 4)).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1])

    def loss_fn():
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    torch.manual_seed(42)
    (outcome,) = adversarial_backward(model, [RDrop(model, alpha=alpha)], loss_fn)
    torch.manual_seed(42)
    reference_loss(ref, x, y, alpha).backward()
    diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    assert diff < 1e-12, diff
    assert outcome.loss > 0 and not bool(outcome.skipped)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_reduction(reduction):
    p, q = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    from lightning_adv.core.rdrop import rdrop_kl

    expected = compute_kl_loss(p, q) / (4 if reduction == "batchmean" else 1)
    assert torch.allclose(rdrop_kl(p, q, reduction), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("manual", [False, True])
def test_lightning_with_accumulation_equals_source_loop(manual):
    """The Lightning fit (accumulate_grad_batches=2; the mixin: one step per batch) equals the source's loop."""
    alpha = 1.5
    data = make_data(16, seed=2)
    module = ManualDrop() if manual else DropModule()
    cb = RDropCallback(alpha=alpha)
    t = trainer(max_epochs=2, callbacks=[cb], **({} if manual else {"accumulate_grad_batches": 2}))
    t.fit(module, loader(data))
    ref = reference_training(list(loader(data)) * 2, alpha, accumulate=1 if manual else 2)
    diff = max_diff(module.model, ref)
    assert diff < 1e-9, diff
    assert cb.attacks == 8 and cb.skipped == 0
    assert "adv/rdrop_loss" in t.progress_bar_metrics
    # and R-Drop changed the training: plain training from the same start differs
    plain = DropModule()
    trainer(max_epochs=2, **({} if manual else {"accumulate_grad_batches": 2})).fit(plain, loader(data))
    assert max_diff(module.model, plain.model) > 1e-3


def test_eval_mode_is_warned():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(max_epochs=1, callbacks=[RDropCallback()]).fit(DropModule(eval_mode=True), loader(make_data(8)))
    (message,) = [str(w.message) for w in record if "lightning_adv" in str(w.message) and "eval mode" in str(w.message)]
    assert "self.model (DropText, attacked by RDropCallback) is in eval mode" in message, message
    assert "RDropCallback then draws the same output twice" in message and "`self.model.train()`" in message
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(max_epochs=1, callbacks=[RDropCallback()]).fit(DropModule(), loader(make_data(8)))
    assert not [w for w in record if "lightning_adv" in str(w.message) and "eval mode" in str(w.message)]


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(alpha=-1.0), ["alpha", "-1.0", ">= 0"]), (dict(alpha=float("nan")), ["alpha"]),
     (dict(reduction="mean"), ["reduction", "'mean'", "sum"])],
)
def test_bad_arguments_fail_at_construction(kwargs, words):
    for make in (lambda: RDropCallback(**kwargs), lambda: RDrop(nn.Linear(2, 2), **kwargs)):
        with pytest.raises(ValueError) as info:
            make()
        for word in words:
            assert word in str(info.value), str(info.value)


def test_missing_logits_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="logits"):
        adversarial_backward(model, [RDrop(model)], lambda: F.cross_entropy(model(x), y))


def test_with_r3f_is_refused():
    class Logits(DropModule):
        pass

    cb = [RDropCallback(), R3FCallback(embedding="model.embeddings.word_embeddings")]
    with pytest.raises(ValueError, match="RDrop with R3F is not supported"):
        trainer(max_epochs=1, callbacks=cb).fit(Logits(), loader(make_data(8)))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(precision):
    from lightning.pytorch.plugins import MixedPrecision

    cb = RDropCallback(alpha=1.0)
    module = DropModule()
    before = [p.detach().clone() for p in module.parameters()]
    t = trainer(max_epochs=1, callbacks=[cb], plugins=[MixedPrecision(precision, "cpu")], accumulate_grad_batches=2)
    t.fit(module, loader(make_data(16)))
    assert cb.attacks == 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))
    assert torch.isfinite(t.callback_metrics["adv/rdrop_loss"])


def test_a_model_without_dropout_is_warned():
    class NoDropout(DropModule):
        def __init__(self):
            super().__init__()
            self.model.drop = nn.Identity()

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(max_epochs=1, callbacks=[RDropCallback()]).fit(NoDropout(), loader(make_data(8)))
    (message,) = [str(w.message) for w in record if "no dropout module" in str(w.message)]
    assert "RDropCallback: NoDropout holds no dropout module" in message and "hidden_dropout_prob" in message
