"""Training with the callbacks equals a plain loop that runs the reference algorithms."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from helpers import TextModule, loader, make_data, max_diff, reference_fit, trainer
from lightning_adv import AWPCallback, FGMCallback

FGM_KW = dict(epsilon=0.7, emb_name="word_embeddings")
AWP_KW = dict(adv_param="weight", adv_lr=0.5, adv_eps=0.05, adv_step=2)


def run_pair(method, kwargs, *, epochs=3, accumulate=1, clip=None, start_epoch=0, dtype=torch.float64, precision="64-true", ref_autocast=None, scaler=None, plugins=None):
    ds = make_data(16)
    module = TextModule(dtype=dtype)
    reference = copy.deepcopy(module)
    cb = None
    if method == "fgm":
        cb = FGMCallback(start_epoch=start_epoch, **kwargs)
    elif method == "awp":
        cb = AWPCallback(start_epoch=start_epoch, **kwargs)
    extra = dict(plugins=plugins) if plugins else dict(precision=precision)
    trainer(max_epochs=epochs, callbacks=[cb] if cb else [], accumulate_grad_batches=accumulate,
            gradient_clip_val=clip, **extra).fit(module, loader(ds))
    batches = [(x, y) for x, y in loader(ds)]
    if dtype == torch.float64:
        batches = [(x, y) for x, y in batches]
    reference_fit(reference, batches, epochs=epochs, method=method, kwargs=kwargs, accumulate=accumulate, clip=clip,
                  autocast_dtype=ref_autocast, scaler=scaler, start_epoch=start_epoch)
    return module, reference, cb


@pytest.mark.parametrize("method,kwargs", [("fgm", FGM_KW), ("awp", AWP_KW), ("awp", dict(AWP_KW, adv_step=1))])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_float64_equals_reference(method, kwargs, accumulate):
    module, reference, cb = run_pair(method, kwargs, accumulate=accumulate, start_epoch=1)
    assert max_diff(module.model, reference.model) < 1e-9
    # start_epoch=1: epochs 1 and 2 attacked, 4 micro-batches each
    assert cb.attacks == 8 and cb.skipped == 0


def test_attack_changes_training():
    """The equivalence above is not vacuous: the attack moves the weights away from plain training."""
    attacked, _, _ = run_pair("fgm", FGM_KW, epochs=1)
    plain, reference, _ = run_pair(None, {}, epochs=1)
    assert max_diff(plain.model, reference.model) < 1e-12
    assert max_diff(attacked.model, plain.model) > 1e-4


def test_awp_zero_lr_and_start_epoch_mean_no_attack():
    ds = make_data(16)
    plain, attacked = TextModule(dtype=torch.float64), TextModule(dtype=torch.float64)
    trainer(max_epochs=2, precision="64-true").fit(plain, loader(ds))
    cb_zero, cb_late = AWPCallback(adv_lr=0.0), FGMCallback(start_epoch=5)
    trainer(max_epochs=2, precision="64-true", callbacks=[cb_zero, cb_late]).fit(attacked, loader(ds))
    assert max_diff(plain.model, attacked.model) == 0.0
    assert cb_zero.attacks == 0 and cb_late.attacks == 0


@pytest.mark.parametrize("method,kwargs", [("fgm", FGM_KW), ("awp", AWP_KW)])
def test_gradient_clipping_acts_on_combined_gradient(method, kwargs):
    module, reference, _ = run_pair(method, kwargs, epochs=2, clip=0.05, accumulate=2)
    assert max_diff(module.model, reference.model) < 1e-9
    unclipped, _, _ = run_pair(method, kwargs, epochs=2, accumulate=2)
    assert max_diff(module.model, unclipped.model) > 1e-4


@pytest.mark.parametrize("method,kwargs", [("fgm", FGM_KW), ("awp", AWP_KW)])
def test_bf16_mixed_equals_autocast_reference(method, kwargs):
    module, reference, _ = run_pair(method, kwargs, epochs=2, dtype=torch.float32, precision="bf16-mixed", ref_autocast=torch.bfloat16)
    assert max_diff(module.model, reference.model) < 1e-5


@pytest.mark.parametrize("method,kwargs", [("fgm", FGM_KW), ("awp", AWP_KW)])
def test_fp16_with_grad_scaler_equals_reference(method, kwargs):
    scaler = torch.amp.GradScaler("cpu")
    module, reference, cb = run_pair(method, kwargs, epochs=2, accumulate=2, dtype=torch.float32,
                                     plugins=[MixedPrecision("16-mixed", "cpu")], ref_autocast=torch.float16, scaler=scaler)
    assert max_diff(module.model, reference.model) < 1e-5
    assert cb.attacks == 8


@pytest.mark.parametrize("method,kwargs", [("fgm", FGM_KW), ("awp", AWP_KW)])
def test_device_side_arithmetic_equals_reference_in_lightning(method, kwargs, monkeypatch):
    """The branch that runs on an accelerator (no host sync, full saved copies), forced here on the CPU."""
    import lightning_adv.core.snapshot as attack_module

    monkeypatch.setattr(attack_module, "on_host", lambda tensors: False)
    module, reference, cb = run_pair(method, kwargs, epochs=2, accumulate=2)
    assert max_diff(module.model, reference.model) < 1e-9 and cb.attacks == 8
