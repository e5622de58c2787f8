"""VAT: float64 equality with a plain loop written from bert4torch (``bert4torch/callbacks.py`` ``VAT`` and the
``AdversarialTraining`` callback's ``vat`` mode), the initial noise drawn from the same seeded generator; why SMART
with the same arguments is not it; argument checks and the CLI-facing callback."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import TinyText, loader, make_data, trainer
from lightning_adv import AdversarialMixin, VATCallback
from lightning_adv.core import SMART, VAT, adversarial_backward

EMB = "embeddings.word_embeddings"


def head(model: TinyText, embeds: torch.Tensor) -> torch.Tensor:
    """TinyText from its embedding output (bert4torch's ``forward_`` with the embedding given)."""
    return model.head(torch.tanh(model.hidden(embeds.mean(dim=1))))


# -- the reference, from bert4torch --------------------------------------------------------------------------------


def kl(inputs, targets, reduction="sum"):
    return F.kl_div(F.log_softmax(inputs, dim=-1), F.softmax(targets, dim=-1), reduction=reduction)


def adv_project(grad, norm_type, eps):
    if norm_type == "l2":
        return grad / (torch.norm(grad, dim=-1, keepdim=True) + eps)
    if norm_type == "l1":
        return grad.sign()
    return grad / (grad.abs().max(-1, keepdim=True)[0] + eps)


def reference_vat(model, ids, y, adv_alpha, adv_step_size, noise_var, noise_gamma, norm_type, generator, scale=1.0):
    embed = model.embeddings.word_embeddings(ids)  # what bert4torch's forward hook keeps
    logits = head(model, embed)
    loss = F.cross_entropy(logits, y)
    # virtual_adversarial_training
    noise = embed.data.new(embed.size()).normal_(0, 1, generator=generator) * noise_var
    noise.requires_grad_()
    new_embed = embed.data.detach() + noise
    adv_logits = head(model, new_embed)
    adv_loss = kl(adv_logits, logits.detach(), reduction="batchmean")
    (delta_grad,) = torch.autograd.grad(adv_loss, noise, only_inputs=True)
    norm = delta_grad.norm()
    if torch.isnan(norm) or torch.isinf(norm):
        adv = None
    else:
        noise = noise + delta_grad * adv_step_size
        noise = adv_project(noise, norm_type=norm_type, eps=noise_gamma)
        new_embed = (embed.data.detach() + noise).detach()
        adv_logits = head(model, new_embed)
        adv = (kl(adv_logits, logits.detach()) + kl(logits, adv_logits.detach())) * adv_alpha
    # on_train_step_end: loss += adv_loss; loss.backward()
    ((loss + (adv if adv is not None else 0)) * scale).backward()


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 40, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)


def ours(model, method, ids, y):
    def loss_fn():
        logits = model(ids)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    return adversarial_backward(model, [method], loss_fn)


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


KW = dict(adv_alpha=2.0, adv_step_size=0.5, noise_var=0.1, noise_gamma=1e-6)


@pytest.mark.parametrize("norm_type", ["l2", "inf", "l1"])
def test_vat_equals_bert4torch_loop_in_float64(norm_type):
    torch.manual_seed(0)
    model = TinyText().double()
    ref = TinyText().double()
    ref.load_state_dict(model.state_dict())
    ids, y = batch()
    (outcome,) = ours(model, VAT(model, embedding=EMB, norm_type=norm_type, generator=torch.Generator().manual_seed(5), **KW), ids, y)
    reference_vat(ref, ids, y, norm_type=norm_type, generator=torch.Generator().manual_seed(5), **KW)
    diff = max_diff(grads(model), grads(ref))
    assert diff < 1e-12, diff
    assert outcome.loss > 0 and not bool(outcome.skipped)


def test_vat_defaults_are_bert4torch_s():
    vat = VATCallback()
    assert (vat.adv_alpha, vat.adv_step_size, vat.noise_var, vat.noise_gamma, vat.norm_type) == (1, 1e-3, 1e-5, 1e-6, "l2")
    torch.manual_seed(0)
    model = TinyText().double()
    ref = TinyText().double()
    ref.load_state_dict(model.state_dict())
    ids, y = batch(1)
    ours(model, VAT(model, embedding=EMB, generator=torch.Generator().manual_seed(2)), ids, y)
    reference_vat(ref, ids, y, 1.0, 1e-3, 1e-5, 1e-6, "l2", torch.Generator().manual_seed(2))
    assert max_diff(grads(model), grads(ref)) < 1e-12


def test_smart_with_the_same_arguments_is_not_bert4torch_vat():
    """Why VAT is its own class: SMART (mt-dnn) differentiates stable_kl summed over the batch in its ascent, takes a
    batch mean in its regulariser and trains the embedding through the perturbed branch; bert4torch differs in all three."""
    torch.manual_seed(0)
    model = TinyText().double()
    ref = TinyText().double()
    ref.load_state_dict(model.state_dict())
    ids, y = batch()
    smart = SMART(model, adv_alpha=2.0, step_size=0.5, noise_var=0.1, epsilon=1e-6, norm="l2", embedding=EMB,
                  generator=torch.Generator().manual_seed(5))
    ours(model, smart, ids, y)
    reference_vat(ref, ids, y, norm_type="l2", generator=torch.Generator().manual_seed(5), **KW)
    assert max_diff(grads(model), grads(ref)) > 1e-4


class LogitsModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyText().double()

    def training_step(self, batch, batch_idx):
        ids, y = batch
        logits = self.model(ids)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ManualLogits(AdversarialMixin, LogitsModule):
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


class Seeded(L.Callback):
    def on_train_start(self, trainer, pl_module):
        for cb in trainer.callbacks:
            if isinstance(cb, VATCallback):
                cb.method.generator = torch.Generator().manual_seed(11)


@pytest.mark.parametrize("manual", [False, True])
def test_lightning_with_accumulation_equals_bert4torch_loop(manual):
    data = make_data(16, seed=2)
    accumulate = 1 if manual else 2
    cb = VATCallback(embedding="model." + EMB, **KW)
    module = ManualLogits() if manual else LogitsModule()
    t = trainer(max_epochs=1, callbacks=[cb, Seeded()], **({} if manual else {"accumulate_grad_batches": 2}))
    t.fit(module, loader(data))
    torch.manual_seed(0)
    ref = TinyText().double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(11)
    for i, (ids, y) in enumerate(loader(data)):
        reference_vat(ref, ids, y, norm_type="l2", generator=gen, scale=1.0 / accumulate, **KW)
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(module.model.parameters(), ref.parameters()))
    assert diff < 1e-9, diff
    assert cb.attacks == 4 and cb.skipped == 0
    assert "adv/vat_loss" in t.progress_bar_metrics


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(adv_alpha=-1.0), ["adv_alpha", "-1.0", ">= 0"]), (dict(noise_var=float("inf")), ["noise_var"]),
     (dict(norm_type="l3"), ["norm_type", "'l3'", "l2"]), (dict(embedding=""), ["embedding"])],
)
def test_bad_arguments_fail_at_construction(kwargs, words):
    with pytest.raises(ValueError) as info:
        VATCallback(**kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(precision):
    from lightning.pytorch.plugins import MixedPrecision

    cb = VATCallback(embedding="model." + EMB)
    module = LogitsModule()
    before = [p.detach().clone() for p in module.parameters()]
    t = trainer(max_epochs=1, callbacks=[cb], plugins=[MixedPrecision(precision, "cpu")], accumulate_grad_batches=2)
    t.fit(module, loader(make_data(16)))
    assert cb.attacks == 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))
    assert torch.isfinite(t.callback_metrics["adv/vat_loss"])
