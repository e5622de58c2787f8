"""SAM, ASAM and Momentum-SAM as callbacks: float64 equality with plain loops written from davda54/sam and
MarlonBecker/MSAM, accumulation, GradScaler, clipping, interval, resume, composition and refusals."""

from __future__ import annotations

import copy
from typing import Any, List, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lightning_adv import FGMCallback, FreeLBCallback, MomentumSAMCallback, R3FCallback, SAMCallback
from lightning_adv.core import FGM, SAM, FreeLB, MomentumSAM, adversarial_backward
from helpers import TextModule, LogitsText, loader, make_data, max_diff, trainer
from test_contract import RefSAM


class SGDText(TextModule):
    def __init__(self, momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(dtype=torch.float64, **kwargs)
        self.momentum = momentum

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)


class AdamText(TextModule):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(dtype=torch.float64, **kwargs)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.0)


def sam_reference(module: TextModule, batches: List[Any], *, epochs: int, rho: float, adaptive: bool, accumulate: int = 1,
                  interval: int = 1, clip: Optional[float] = None) -> None:
    """davda54/sam's loop run on every micro-batch (its clean gradient alone: first_step, the backward at w + e,
    second_step's restore), the micro-batches' gradients accumulated, clipping on the final gradient."""
    model = module.model
    opt = module.configure_optimizers()
    params = list(model.parameters())
    steps = 0
    for _ in range(epochs):
        for i, (ids, y) in enumerate(batches):
            earlier = [p.grad for p in params]
            for p in params:
                p.grad = None

            def loss() -> torch.Tensor:
                return F.cross_entropy(model(ids), y) / accumulate

            loss().backward()
            if steps % interval == 0:
                sam = RefSAM(params, None, rho, adaptive)
                sam.first_step()
                loss().backward()
                with torch.no_grad():
                    for p, e in sam.e_w.items():
                        p.sub_(e)
            for p, old in zip(params, earlier):
                if old is not None:
                    p.grad = old if p.grad is None else p.grad + old
            if (i + 1) % accumulate == 0:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1


def _batches(n: int = 16):
    return list(loader(make_data(n)))


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sam_callback_equals_davda54_loop_float64(adaptive, rho, accumulate):
    ours, ref = SGDText(), SGDText()
    cb = SAMCallback(rho=rho, adaptive=adaptive)
    trainer(max_epochs=3, callbacks=[cb], accumulate_grad_batches=accumulate, precision="64-true").fit(ours, loader(make_data(16)))
    sam_reference(ref, _batches(), epochs=3, rho=rho, adaptive=adaptive, accumulate=accumulate)
    assert max_diff(ours.model, ref.model) < 1e-9
    assert cb.attacks == 12
    plain = SGDText()
    trainer(max_epochs=3, accumulate_grad_batches=accumulate, precision="64-true").fit(plain, loader(make_data(16)))
    assert max_diff(ours.model, plain.model) > 1e-4


def test_sam_interval_and_clipping_equal_reference():
    ours, ref = SGDText(), SGDText()
    cb = SAMCallback(rho=0.1, interval=2)
    trainer(max_epochs=2, callbacks=[cb], gradient_clip_val=0.05, precision="64-true").fit(ours, loader(make_data(16)))
    sam_reference(ref, _batches(), epochs=2, rho=0.1, adaptive=False, interval=2, clip=0.05)
    assert max_diff(ours.model, ref.model) < 1e-9
    assert cb.attacks == 4  # steps 0, 2, 4, 6 of 8


def test_sam_with_scheduler_and_param_groups_equals_reference():
    class Groups(SGDText):
        def configure_optimizers(self):
            opt = torch.optim.SGD([{"params": self.model.embeddings.parameters(), "lr": 0.05},
                                   {"params": list(self.model.hidden.parameters()) + list(self.model.head.parameters())}],
                                  lr=0.1, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]

    ours, ref = Groups(), Groups()
    trainer(max_epochs=2, callbacks=[SAMCallback(rho=0.1)], precision="64-true").fit(ours, loader(make_data(16)))
    # the reference: the same per-micro-batch SAM, the scheduler stepped per epoch as Lightning does by default
    model, (opts, scheds) = ref.model, ref.configure_optimizers()
    opt, sched = opts[0], scheds[0]
    params = list(model.parameters())
    for _ in range(2):
        for ids, y in _batches():
            F.cross_entropy(model(ids), y).backward()
            sam = RefSAM(params, None, 0.1, False)
            sam.first_step()
            F.cross_entropy(model(ids), y).backward()
            with torch.no_grad():
                for p, e in sam.e_w.items():
                    p.sub_(e)
            opt.step()
            opt.zero_grad()
        sched.step()
    assert max_diff(ours.model, ref.model) < 1e-9


def test_sam_fp16_grad_scaler_skips_overflow_and_trains():
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = TextModule()
    before = copy.deepcopy(module.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 18)  # the first steps overflow in fp16
    cb = SAMCallback(rho=0.05)
    trainer(max_epochs=2, callbacks=[cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler)]).fit(module, loader(make_data(16)))
    assert cb.attacks == 8 and 0 < cb.skipped < 8  # overflowing attacks skipped (nothing perturbed), the rest ran
    assert all(bool(torch.isfinite(p).all()) for p in module.model.parameters())
    assert max_diff(module.model, before) > 0


def test_sam_bf16_runs_and_differs_from_plain():
    module, plain = TextModule(), TextModule()
    cb = SAMCallback(rho=0.5)
    trainer(max_epochs=1, callbacks=[cb], precision="bf16-mixed").fit(module, loader(make_data(16)))
    trainer(max_epochs=1, precision="bf16-mixed").fit(plain, loader(make_data(16)))
    assert cb.attacks == 4 and cb.skipped == 0
    assert max_diff(module.model, plain.model) > 0


@pytest.mark.parametrize("make", [lambda: SAMCallback(rho=0.1), lambda: MomentumSAMCallback(rho=0.3)])
def test_resume_equals_uninterrupted_and_checkpoint_holds_clean_weights(make, tmp_path):
    data = make_data(16)
    straight = SGDText()
    trainer(max_epochs=2, callbacks=[make()], precision="64-true").fit(straight, loader(data))
    first = SGDText()
    seen: List[Any] = []

    class Clean(L.Callback):  # the weights a checkpoint saves are the ones the optimizer's last step left
        def on_fit_start(self, trainer, pl_module):
            def stepped(optimizer, args, kwargs):
                self.after_step = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

            trainer.optimizers[0].register_step_post_hook(stepped)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            seen.append(all(torch.equal(checkpoint["state_dict"][k], v) for k, v in self.after_step.items()))

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # at the end of epoch 0 of 2
    every = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_top_k=-1)  # after every step
    trainer(max_epochs=1, callbacks=[make(), ckpt, every, Clean()], enable_checkpointing=True,
            precision="64-true").fit(first, loader(data))
    resumed = SGDText()
    cb = make()
    trainer(max_epochs=2, callbacks=[cb], precision="64-true").fit(resumed, loader(data), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(seen) >= 5 and all(seen)
    assert cb.attacks == 8
    assert max_diff(straight.model, resumed.model) < 1e-12


# -- Momentum-SAM ------------------------------------------------------------------------------------------------


def msam_sgd_reference(module: SGDText, batches, epochs: int, rho: float, momentum: float = 0.9, lr: float = 0.1) -> None:
    """MarlonBecker/MSAM optimizer/msam.py (weight_decay 0) written out from its source: the stored weights stay at
    w - rho * v / ||v|| between steps; each step moves back, takes the SGD step, and moves up again."""
    model = module.model
    params = list(model.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    inverse_norm = 0.0
    for _ in range(epochs):
        for ids, y in batches:
            F.cross_entropy(model(ids), y).backward()
            with torch.no_grad():
                for p, b in zip(params, bufs):
                    p.add_(b, alpha=rho * inverse_norm)
                    b.mul_(momentum).add_(p.grad)
                    p.add_(b, alpha=-lr)
                inverse_norm = float(1 / (torch.norm(torch.stack([b.norm(p=2) for b in bufs]), p=2) + 1e-12))
                for p, b in zip(params, bufs):
                    p.sub_(b, alpha=rho * inverse_norm)
                    p.grad = None
    with torch.no_grad():  # move_back_from_momentumAscent
        for p, b in zip(params, bufs):
            p.add_(b, alpha=rho * inverse_norm)


def msam_adamw_reference(module: AdamText, batches, epochs: int, rho: float, lr: float = 0.01,
                         betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    """MarlonBecker/MSAM optimizer/adamW_msam.py (weight_decay 0) written out from its source."""
    model = module.model
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    norm_factor, step = 0.0, 0
    for _ in range(epochs):
        for ids, y in batches:
            F.cross_entropy(model(ids), y).backward()
            step += 1
            with torch.no_grad():
                for p, a, b in zip(params, m, v):
                    p.add_(a, alpha=norm_factor)
                    a.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                    b.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                    denom = (b.sqrt() / (1 - betas[1] ** step) ** 0.5).add_(eps)
                    p.addcdiv_(a, denom, value=-lr / (1 - betas[0] ** step))
                norm_factor = float(rho / (torch.norm(torch.stack([a.norm(p=2) for a in m]), p=2) + 1e-12))
                for p, a in zip(params, m):
                    p.sub_(a, alpha=norm_factor)
                    p.grad = None
    with torch.no_grad():
        for p, a in zip(params, m):
            p.add_(a, alpha=norm_factor)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_momentum_sam_equals_msam_source_float64(kind):
    make = SGDText if kind == "sgd" else AdamText
    ours, ref = make(), make()
    cb = MomentumSAMCallback(rho=0.3)
    trainer(max_epochs=3, callbacks=[cb], precision="64-true").fit(ours, loader(make_data(16)))
    (msam_sgd_reference if kind == "sgd" else msam_adamw_reference)(ref, _batches(), epochs=3, rho=0.3)
    assert max_diff(ours.model, ref.model) < 1e-9
    assert cb.attacks == 12
    plain = make()
    trainer(max_epochs=3, precision="64-true").fit(plain, loader(make_data(16)))
    assert max_diff(ours.model, plain.model) > 1e-4


def test_momentum_sam_refuses_an_optimizer_without_momentum():
    with pytest.raises(ValueError, match=r"MomentumSAMCallback: MomentumSAM needs an optimizer that keeps a momentum.*SGD with momentum=0"):
        trainer(max_steps=1, callbacks=[MomentumSAMCallback()]).fit(SGDText(momentum=0.0), loader(make_data(8)))


def test_momentum_sam_composition_rules():
    with pytest.raises(ValueError, match=r"MomentumSAM with FGM is not supported"):
        trainer(max_steps=1, callbacks=[MomentumSAMCallback(), FGMCallback()]).fit(SGDText(), loader(make_data(8)))
    with pytest.raises(ValueError, match=r"dropped silently"):
        trainer(max_steps=1, callbacks=[SAMCallback(), R3FCallback(embedding="model.embeddings.word_embeddings")]).fit(
            LogitsText(), loader(make_data(8)))


def test_momentum_sam_leaves_weights_clean_when_a_step_raises():
    class Boom(SGDText):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Boom()
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append(copy.deepcopy(pl_module.model))

    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=1, callbacks=[Snap(), MomentumSAMCallback(rho=0.5)]).fit(module, loader(make_data(16)))
    assert max_diff(module.model, snapshots[-1]) == 0.0  # the perturbation of the failed step was undone


# -- composition (core, float64) ------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


def test_sam_with_fgm_and_freelb_is_the_sum_of_independent_contributions():
    """[SAM, FGM] = g_sam + g_fgm_adv; [SAM, FreeLB(delta0 = 0)] = g_sam + FreeLB's ascent passes (weighted): each as
    if computed alone, either order."""
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 30, (4, 5), generator=g), torch.tensor([0, 1, 2, 0])
    loss = lambda net: (lambda: F.cross_entropy(net(ids), y))  # noqa: E731
    nets = {k: Net() for k in ("clean", "sam", "fgm", "freelb", "sam_fgm", "fgm_sam", "sam_freelb", "freelb_sam")}
    loss(nets["clean"])().backward()
    adversarial_backward(nets["sam"], [SAM(nets["sam"], rho=0.2)], loss(nets["sam"]))
    adversarial_backward(nets["fgm"], [FGM(nets["fgm"], epsilon=0.5, emb_name="emb")], loss(nets["fgm"]))
    adversarial_backward(nets["freelb"], [FreeLB(nets["freelb"], adv_init_mag=0.0, embedding="emb")], loss(nets["freelb"]))
    for key, order in (("sam_fgm", ("sam", "fgm")), ("fgm_sam", ("fgm", "sam")), ("sam_freelb", ("sam", "freelb")),
                       ("freelb_sam", ("freelb", "sam"))):
        net = nets[key]
        make = {"sam": lambda: SAM(net, rho=0.2), "fgm": lambda: FGM(net, epsilon=0.5, emb_name="emb"),
                "freelb": lambda: FreeLB(net, adv_init_mag=0.0, embedding="emb")}
        adversarial_backward(net, [make[o]() for o in order], loss(net))
    clean, sam, fgm, freelb = (_grads(nets[k]) for k in ("clean", "sam", "fgm", "freelb"))
    weight = 1 / 3
    for key in ("sam_fgm", "fgm_sam"):
        for got, s, f, c in zip(_grads(nets[key]), sam, fgm, clean):
            assert torch.allclose(got, s + f - c, rtol=0, atol=1e-12)
    for key in ("sam_freelb", "freelb_sam"):
        for got, s, f, c in zip(_grads(nets[key]), sam, freelb, clean):
            assert torch.allclose(got, s + f - weight * c, rtol=0, atol=1e-12)


def test_cli_flags_and_range_errors(capsys):
    from test_cli import cli

    for callback, arg, value, rule in (("SAMCallback", "rho", "-1", ">= 0"), ("SAMCallback", "interval", "0", "integer >= 1"),
                                       ("MomentumSAMCallback", "rho", "nan", ">= 0")):
        with pytest.raises(SystemExit) as exit_info:
            cli([f"--trainer.callbacks+={callback}", f"--trainer.callbacks.{arg}={value}"])
        assert exit_info.value.code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert arg in err and rule in err, err[-600:]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "llama"])
@pytest.mark.parametrize("make", [lambda: SAMCallback(rho=0.1), lambda: SAMCallback(rho=0.5, adaptive=True),
                                  lambda: MomentumSAMCallback(rho=0.3)])
def test_real_architectures_with_a_frozen_input_embedding(arch, make):
    """Tiny transformers models from configs (the input embedding frozen, tied to the LM head for GPT-2 and T5): every
    micro-batch attacked, the frozen weights untouched, the others trained, nothing left on the model."""
    from test_usage import ARCHS, HFModule, hf_batches

    build, task, pad = ARCHS[arch][:3]
    module = HFModule(build)
    frozen = module.model.get_input_embeddings().weight
    frozen.requires_grad_(False)
    before_frozen = frozen.detach().clone()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    cb = make()
    data = hf_batches(task, pad)
    trainer(max_epochs=1, callbacks=[cb]).fit(module, data)
    assert cb.attacks == len(data) and cb.skipped == 0
    assert torch.equal(frozen.detach(), before_frozen)
    assert max(float((p.detach() - before[n]).abs().max()) for n, p in module.named_parameters() if n in before) > 0
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) == 0
