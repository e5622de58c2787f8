"""AdversarialMixin: the same attacks for manual-optimization modules."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from helpers import ManualText, TextModule, loader, make_data, max_diff, reference_fit, trainer
from lightning_adv import AdversarialMixin, AWPCallback, FGMCallback

FGM_KW = dict(epsilon=0.7, emb_name="word_embeddings")
AWP_KW = dict(adv_param="weight", adv_lr=0.5, adv_eps=0.05, adv_step=2)


def fit_pair(method, kwargs, *, accumulate=1, epochs=2, dtype=torch.float64, precision="64-true", plugins=None, scaler=None, ref_autocast=None):
    ds = make_data(16)
    module = ManualText(accumulate=accumulate, dtype=dtype)
    reference = copy.deepcopy(module)
    cbs = {"fgm": [FGMCallback(**kwargs)] if method == "fgm" else [], "awp": [AWPCallback(**kwargs)] if method == "awp" else []}
    callbacks = cbs.get(method, [])
    extra = dict(plugins=plugins) if plugins else dict(precision=precision)
    trainer(max_epochs=epochs, callbacks=callbacks, **extra).fit(module, loader(ds))
    reference_fit(reference, list(loader(ds)), epochs=epochs, method=method, kwargs=kwargs, accumulate=accumulate,
                  autocast_dtype=ref_autocast, scaler=scaler)
    return module, reference, callbacks


@pytest.mark.parametrize("method,kwargs", [("fgm", FGM_KW), ("awp", AWP_KW), (None, {})])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_manual_float64_equals_reference(method, kwargs, accumulate):
    module, reference, callbacks = fit_pair(method, kwargs, accumulate=accumulate)
    assert max_diff(module.model, reference.model) < 1e-9
    passes = {"fgm": 2, "awp": 3, None: 1}[method]
    assert module.loss_fn_calls == 8 * passes
    if callbacks:
        assert callbacks[0].attacks == 8


def test_manual_fp16_with_scaler_equals_reference():
    scaler = torch.amp.GradScaler("cpu")
    module, reference, callbacks = fit_pair("awp", AWP_KW, dtype=torch.float32, plugins=[MixedPrecision("16-mixed", "cpu")],
                                            scaler=scaler, ref_autocast=torch.float16)
    assert max_diff(module.model, reference.model) < 1e-5
    assert callbacks[0].attacks == 8
    module, reference, _ = fit_pair("fgm", FGM_KW, dtype=torch.float32, plugins=[MixedPrecision("16-mixed", "cpu")],
                                    scaler=torch.amp.GradScaler("cpu"), ref_autocast=torch.float16)
    assert max_diff(module.model, reference.model) < 1e-5


def test_manual_logging_and_metrics_count_clean_pass_only():
    module = ManualText()
    trainer(max_epochs=1, callbacks=[FGMCallback(epsilon=2.0)]).fit(module, loader(make_data(16)))
    metrics = module.trainer.callback_metrics
    assert module.loss_fn_calls == 8 and module.update_counts == [1, 2, 3, 4]
    assert torch.allclose(metrics["train_loss_epoch"], torch.tensor(module.clean_losses).mean(), atol=1e-6)
    assert float(metrics["adv/fgm_attacks"]) == 4


class TwoNets(AdversarialMixin, TextModule):
    """Two optimizers, each on its own network, toggled in turn (the GAN pattern)."""

    def __init__(self):
        super().__init__(dtype=torch.float64)
        self.automatic_optimization = False
        torch.manual_seed(1)
        self.other = copy.deepcopy(self.model)
        self.checks = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        for opt, net, idle in zip(self.optimizers(), (self.model, self.other), (self.other, self.model)):
            self.toggle_optimizer(opt)
            sentinel = [torch.full_like(p, 7.0) for p in idle.parameters()]
            for p, s in zip(idle.parameters(), sentinel):
                p.grad = s
            idle_before = [p.detach().clone() for p in idle.parameters()]

            def loss_fn(net=net, idle=idle, idle_before=idle_before):
                self.checks.append(all(torch.equal(p, q) for p, q in zip(idle.parameters(), idle_before)))
                return nn.functional.cross_entropy(net(ids), y)

            self.adversarial_backward(loss_fn)
            self.checks.append(all(p.grad is s for p, s in zip(idle.parameters(), sentinel)))
            for p in idle.parameters():
                p.grad = None
            opt.step()
            opt.zero_grad()
            self.untoggle_optimizer(opt)


def test_two_optimizers_only_trainable_parameters_attacked():
    module = TwoNets()
    reference = copy.deepcopy(module)
    awp = AWPCallback(**AWP_KW)
    trainer(max_epochs=1, callbacks=[awp], precision="64-true").fit(module, loader(make_data(16)))
    assert all(module.checks) and len(module.checks) == 4 * 2 * 4  # 3 loss_fn calls + 1 grad check, 2 nets, 4 steps
    assert awp.attacks == 8
    # each network trained exactly as the reference trains it alone on the same batches
    for name in ("model", "other"):
        ref = copy.deepcopy(reference)
        ref.model = getattr(reference, name)
        ref.configure_optimizers = lambda ref=ref: torch.optim.SGD(ref.model.parameters(), lr=0.1)
        reference_fit(ref, list(loader(make_data(16))), epochs=1, method="awp", kwargs=AWP_KW)
        assert max_diff(getattr(module, name), ref.model) < 1e-9


def test_pytorch_lightning_namespace():
    import pytorch_lightning as PL

    class PLManual(AdversarialMixin, PL.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.model = TextModule(dtype=torch.float64).model

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.adversarial_backward(lambda: nn.functional.cross_entropy(self.model(batch[0]), batch[1]))
            opt.step()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.05)

    module = PLManual()
    reference = TextModule(dtype=torch.float64)
    fgm = FGMCallback(**FGM_KW)
    PL.Trainer(max_epochs=1, callbacks=[fgm], logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, precision="64-true").fit(module, loader(make_data(16)))
    reference_fit(reference, list(loader(make_data(16))), epochs=1, method="fgm", kwargs=FGM_KW)
    assert fgm.attacks == 4
    assert max_diff(module.model, reference.model) < 1e-9
