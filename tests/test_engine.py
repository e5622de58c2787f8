"""The engine's contract, method-independent: plain-loop misuse, skipped passes, restores and hooks on errors,
what is shown at fit start and on the progress bar."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import TextModule, TinyText, loader, make_data, trainer
from lightning_adv import FGMCallback, FreeLBCallback, PGDCallback
from lightning_adv.core import AWP, FGM, PGD, R3F, SAM, SMART, FreeLB, adversarial_backward

EMB = "embeddings.word_embeddings"


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 40, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize("make", [lambda m: FGM(m), lambda m: AWP(m), lambda m: PGD(m)])
def test_plain_loop_without_clean_backward_raises_with_the_fix(make):
    model = TinyText()
    ids, y = _batch()
    with pytest.raises(RuntimeError, match=r"no parameter of the model holds a gradient.*loss.backward\(\)"):
        make(model).attack_backward(lambda: F.cross_entropy(model(ids), y))


def test_a_pass_returning_none_skips_the_attack_and_keeps_the_clean_gradient():
    torch.manual_seed(0)
    model = TinyText().double()
    ids, y = _batch()
    calls = []

    def loss_fn():
        calls.append(1)
        return F.cross_entropy(model(ids), y) if len(calls) == 1 else None

    (outcome,) = adversarial_backward(model, [FGM(model, emb_name="word")], loss_fn)
    assert outcome.loss is None and bool(outcome.skipped)
    clean = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(ids), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(clean, model.parameters()))


@pytest.mark.parametrize("make", [lambda m: FGM(m), lambda m: PGD(m, steps=2), lambda m: AWP(m, adv_step=2), lambda m: FreeLB(m, embedding=EMB)])
def test_weights_restored_and_hooks_removed_when_a_pass_raises(make):
    torch.manual_seed(0)
    model = TinyText()
    ids, y = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return F.cross_entropy(model(ids), y)

    with pytest.raises(KeyError, match="boom"):
        adversarial_backward(model, [make(model)], loss_fn)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.requires_grad for p in model.parameters())  # PGD's and AWP's inner pass froze the others: thawed
    assert not model.embeddings.word_embeddings._forward_hooks


@pytest.mark.parametrize("make", [lambda m: PGD(m, steps=3), lambda m: AWP(m, adv_param="word", adv_step=3)])
def test_inner_passes_compute_only_the_perturbed_gradients_and_change_no_bit(make, monkeypatch):
    """PGD's (and AWP's) inner passes: only the perturbed parameters get a gradient (the others' weight gradients,
    a third of a forward+backward, are skipped), and the step's gradients are bit for bit those of full backward
    passes."""
    import contextlib

    from lightning_adv.core.step import AttackStep

    def run(full):
        torch.manual_seed(0)
        model = TinyText()
        ids, y = _batch()
        weight_grads = []
        model.head.weight.register_hook(lambda g: weight_grads.append(1))
        with monkeypatch.context() as mp:  # (not monkeypatch.undo(): that would also undo conftest's chdir)
            if full:
                mp.setattr(AttackStep, "gradients_only_for", lambda self, params: contextlib.nullcontext())
            adversarial_backward(model, [make(model)], lambda: F.cross_entropy(model(ids), y))
        assert all(p.requires_grad for p in model.parameters())
        return [p.grad.clone() for p in model.parameters()], len(weight_grads)

    (lean, lean_calls), (full, full_calls) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(lean, full))
    assert (lean_calls, full_calls) == (2, 4)  # the clean and the last pass, against every pass


def test_fit_start_names_what_each_callback_attacks_and_progress_bar_shows_the_loss(caplog):
    module = TextModule()
    cbs = [FGMCallback(emb_name="embeddings"), FreeLBCallback(embedding="model." + EMB)]
    t = trainer(max_epochs=1, callbacks=cbs)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        t.fit(module, loader(make_data(8)))
    text = caplog.text
    assert "FGMCallback attacks 1 parameter (320 values): model.embeddings.word_embeddings.weight, from epoch 0" in text
    assert "FreeLBCallback attacks the output of model.embeddings.word_embeddings, from epoch 0" in text
    assert {"adv/fgm_loss", "adv/freelb_loss"} <= set(t.progress_bar_metrics)


def test_dataloader_iter_training_step_is_refused_at_setup():
    class IterModule(TextModule):
        def training_step(self, dataloader_iter):
            ids, y = next(dataloader_iter)[0]
            return F.cross_entropy(self.model(ids), y)

    with pytest.raises(ValueError, match="dataloader_iter"):
        trainer(max_epochs=1, callbacks=[PGDCallback(emb_name="word")]).fit(IterModule(), loader(make_data(8)))


def test_freelb_without_an_embedding_module_lists_candidates():
    with pytest.raises(ValueError, match=r"embedding=None.*get_input_embeddings.*Embedding modules: embeddings.word_embeddings"):
        FreeLB(TinyText())
    with pytest.raises(ValueError, match=r"no submodule 'nope'"):
        FreeLB(TinyText(), embedding="nope")


def test_awp_start_step_attacks_from_that_optimizer_step_on():
    from lightning_adv import AWPCallback

    cb = AWPCallback(adv_lr=0.5, adv_eps=0.01, start_step=3)
    t = trainer(max_epochs=1, callbacks=[cb], accumulate_grad_batches=2)
    t.fit(TextModule(), loader(make_data(32)))  # 8 micro-batches, 4 optimizer steps: steps 3 (2 micro-batches)
    assert cb.attacks == 2
    with pytest.raises(ValueError, match=r"start_step=-1"):
        AWPCallback(start_step=-1)


# -- gradients that are views into a shared buffer (FSDP's flat gradient) -------------------------------------------


def _views_step(model, methods, ids, y, grads_are_views):
    from lightning_adv.core import AttackStep

    def loss_fn():
        logits = model(ids)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    step = AttackStep(model.parameters(), methods, loss_fn, grads_are_views=grads_are_views)
    try:
        step.before_forward()
        out = loss_fn()
        step.before_backward(out)
        joined = step.take_joined()  # R3F, SMART with grads_are_views: their extra loss joins the clean backward
        (out["loss"] if joined is None else out["loss"] + joined).backward()
        step.after_backward()
    finally:
        step.close()


@pytest.mark.parametrize("make", [lambda m: FreeLB(m, adv_lr=0.3, adv_steps=2, adv_init_mag=0.0, embedding=EMB),
                                  lambda m: R3F(m, eps=0.3, embedding=EMB, generator=torch.Generator().manual_seed(1)),
                                  lambda m: SMART(m, adv_alpha=2.0, step_size=0.5, noise_var=0.1, steps=2, embedding=EMB,
                                                  generator=torch.Generator().manual_seed(1)),
                                  lambda m: SAM(m, rho=0.3), lambda m: SAM(m, rho=0.5, adaptive=True)])
def test_gradient_views_give_the_gradient_of_moving_them(make):
    """With `.grad` never reassigned (views into FSDP's flat gradient): an accumulated micro-batch gives exactly the
    gradient of the default path, which moves the `.grad` tensors aside. The earlier gradient stays in `.grad` (FreeLB:
    divided by its clean weight before the clean backward); SMART's ascent gradient comes from a full backward with
    `.grad` written back in place (AttackStep.input_gradient); R3F's and SMART's perturbed loss joins the clean one; SAM
    (which reads the gradient) gets the clean gradient alone, the earlier one copied aside and added back in place."""
    results = []
    for in_place in (False, True):
        torch.manual_seed(0)
        model = TinyText().double()
        (ids, y), (ids2, y2) = _batch(), (torch.randint(0, 40, (4, 5)), torch.randint(0, 3, (4,)))
        F.cross_entropy(model(ids), y).backward()  # an earlier micro-batch
        views = [p.grad for p in model.parameters()]
        _views_step(model, [make(model)], ids2, y2, in_place)
        if in_place:  # the same tensors, as FSDP's views must stay
            assert all(p.grad is v for p, v in zip(model.parameters(), views))
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_norm_over_shards_sums_the_squares_over_the_processes():
    from lightning_adv.core import AttackStep

    local = torch.tensor(3.0, dtype=torch.float64)
    assert AttackStep([], [], lambda: None).norm_over_shards(local) is local  # whole gradients: the local norm itself
    four_shards = AttackStep([], [], lambda: None, shard_sum=lambda t: 4 * t)  # four processes with the same norm
    assert float(four_shards.norm_over_shards(local)) == 6.0


def test_two_methods_after_the_backward_refuse_gradient_views():
    model = TinyText()
    ids, y = _batch()
    with pytest.raises(ValueError, match=r"FreeLB and FreeLB all run after the backward.*at most one of them"):
        # on two modules: two FreeLBs on one module are refused by the composition rule first (test_reliability)
        _views_step(model, [FreeLB(model, embedding=EMB), FreeLB(model, embedding="hidden")], ids, y, True)


def test_weight_space_methods_refuse_gradient_views():
    model = TinyText()
    ids, y = _batch()
    for methods, named in (([FGM(model)], "FGM perturbs"), ([AWP(model), PGD(model)], "AWP, PGD perturb")):
        with pytest.raises(ValueError, match=rf"{named} weights along the whole parameter gradient.*FreeLB, R3F, SMART"):
            _views_step(model, methods, ids, y, True)


def test_input_gradient_with_views_leaves_grad_as_it_was():
    """The full-backward path of AttackStep.input_gradient gives autograd.grad's value and writes `.grad` back in
    place: values kept where there were some, zeros where the parameter had none."""
    from lightning_adv.core import AttackStep

    torch.manual_seed(0)
    model = TinyText().double()
    ids, y = _batch()
    F.cross_entropy(model(ids), y).backward()
    model.head.bias.grad = None
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    views = {n: p.grad for n, p in model.named_parameters()}
    delta = torch.zeros(ids.shape[0], ids.shape[1], 8, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        h = model.embeddings.word_embeddings(ids) + delta
        return F.cross_entropy(model.head(torch.tanh(model.hidden(h.mean(1)))), y)

    expected = AttackStep(list(model.parameters()), [], loss).input_gradient(loss(), delta)
    got = AttackStep(list(model.parameters()), [], loss, grads_are_views=True).input_gradient(loss(), delta)
    assert torch.allclose(got, expected, rtol=0, atol=1e-15) and float(got.abs().max()) > 0
    assert delta.grad is None
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is not None and float(p.grad.abs().max()) == 0.0  # the backward created it: zeroed
        else:
            assert p.grad is views[n] and torch.equal(p.grad, before[n])


def test_skipped_freelb_pass_with_gradient_views_warns():
    """A FreeLB pass that returns None after the clean backward: with views the clean gradient cannot be told apart
    from the earlier ones any more, so it stays weighted by clean_weight, and the user is told."""
    from lightning_adv.core import AttackStep

    model = TinyText()
    ids, y = _batch()
    calls = []

    def loss_fn():
        calls.append(1)
        return None if len(calls) > 1 else F.cross_entropy(model(ids), y)

    step = AttackStep(model.parameters(), [FreeLB(model, adv_steps=2, embedding=EMB)], loss_fn, grads_are_views=True)
    try:
        step.before_forward()
        out = loss_fn()
        step.before_backward(out)
        out.backward()
        with pytest.warns(RuntimeWarning, match=r"FreeLB: a pass returned None .* weighted by 0.333333, as if attacked"):
            (outcome,) = step.after_backward()
    finally:
        step.close()
    assert bool(outcome.skipped)
