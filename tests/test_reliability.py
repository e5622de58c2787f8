"""Issue 23: composition and lifecycle. Each test failed before its fix (the issue's probe numbers in comments)."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

import lightning_adv
from lightning_adv import (
    AWPCallback, FGMCallback, FreeLBCallback, NEFTuneCallback, PGDCallback, R3FCallback, RobustAccuracy, SMARTCallback,
)
from lightning_adv.core import AWP, FGM, PGD, R3F, SMART, FreeLB, adversarial_backward
from lightning_adv.core.embedding import per_example_norms
from helpers import CLASSES, DIM, SEQ, VOCAB, LogitsText, TextModule, loader, make_data, max_diff, trainer

torch.set_printoptions(precision=10)


# ---------------------------------------------------------------------------------------------------------------
# 1. FreeLB composed with the other methods: every pass runs at FreeLB's delta0
# ---------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    """TinyText in float64, with the part above the embedding callable on its own (for the reference)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.hidden = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)
        self.double()
        self.seen: List[torch.Tensor] = []  # every embedding output the layers above saw (after every hook)

    def above(self, e: torch.Tensor) -> torch.Tensor:
        self.seen.append(e.detach().clone())
        return self.head(torch.tanh(self.hidden(e.mean(1))))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.above(self.emb(ids))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    ids[0, -2:] = 0  # padding
    return ids, torch.randint(0, CLASSES, (4,), generator=g)


def _recorder(module: nn.Module) -> List[torch.Tensor]:
    """Every output of ``module`` as the model sees it (registered last: after every method's hook)."""
    seen: List[torch.Tensor] = []
    module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen


@pytest.mark.parametrize("freelb_first", [True, False])
def test_r3f_with_freelb_perturbs_around_delta0(freelb_first):
    """Before: R3F compared f(x + delta0) with f(x + noise): an offset of 3.7e-2 at the embedding output instead of
    eps. Now its perturbed pass is at x + delta0 + noise, either order."""
    net = Net()
    ids, y = _batch()
    eps = 1e-5
    freelb = FreeLB(net, adv_steps=1, adv_init_mag=0.6, embedding="emb", generator=torch.Generator().manual_seed(0))
    r3f = R3F(net, eps=eps, embedding="emb", generator=torch.Generator().manual_seed(1))
    seen = net.seen

    def loss_fn():
        logits = net(ids)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    adversarial_backward(net, [freelb, r3f] if freelb_first else [r3f, freelb], loss_fn)
    clean, noisy = seen[0], seen[1]  # the clean pass, R3F's pass (then FreeLB's ascent pass)
    offset = float((noisy - clean).abs().max())
    assert 0 < offset <= eps * (1 + 1e-9)
    raw = net.emb(ids).detach()
    assert float((clean - raw).abs().max()) > 1e-3  # delta0 is there


def _freelb_r3f_reference(net: Net, ids, y, *, adv_lr, adv_steps, init, eps, lam, seed_freelb, seed_r3f):
    """FreeLB (fairseq freelb_train_step, l2) with R3F's regulariser in its clean pass, written out by hand:

    clean objective J0 = CE(f(E + d0)) + lam * symKL(f(E + d0), f(E.detach() + d0 + noise)), every pass weighted
    1/(1+K); d1 = d0 + adv_lr * g / ||g|| with g = dJ0/d(d0) through the clean branch.
    """
    e = net.emb(ids)
    mask = (ids != 0).unsqueeze(-1).double()
    lengths = (ids != 0).sum(1).clamp_min(1).double()
    d0 = torch.empty_like(e).uniform_(-1, 1, generator=torch.Generator().manual_seed(seed_freelb)) * mask
    d0 = (d0 * (init / torch.sqrt(lengths * e.shape[-1])).view(-1, 1, 1)).detach().requires_grad_()
    noise = torch.empty_like(e).uniform_(-eps, eps, generator=torch.Generator().manual_seed(seed_r3f)) * mask
    clean_logits = net.above(e + d0)
    noisy_logits = net.above(e.detach() + d0.detach() + noise)
    p, q = F.log_softmax(clean_logits, -1), F.log_softmax(noisy_logits, -1)
    sym = (F.kl_div(q, p, log_target=True, reduction="sum") + F.kl_div(p, q, log_target=True, reduction="sum")) / ids.shape[0]
    j0 = F.cross_entropy(clean_logits, y) + lam * sym
    (j0 / (1 + adv_steps)).backward()
    delta, grad = d0, d0.grad
    for _ in range(adv_steps):
        delta = (delta.detach() + adv_lr * grad / per_example_norms(grad).clamp_min(1e-10)).requires_grad_()
        (F.cross_entropy(net.above(net.emb(ids) + delta), y) / (1 + adv_steps)).backward()
        grad = delta.grad


def test_freelb_with_r3f_equals_reference_float64():
    kw = dict(adv_lr=0.1, adv_steps=2, init=0.6, eps=1e-2, lam=1.0, seed_freelb=3, seed_r3f=4)
    net, ref = Net(), Net()
    ids, y = _batch()
    freelb = FreeLB(net, adv_lr=kw["adv_lr"], adv_steps=kw["adv_steps"], adv_init_mag=kw["init"], embedding="emb",
                    generator=torch.Generator().manual_seed(kw["seed_freelb"]))
    r3f = R3F(net, eps=kw["eps"], r3f_lambda=kw["lam"], embedding="emb", generator=torch.Generator().manual_seed(kw["seed_r3f"]))

    def loss_fn():
        logits = net(ids)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    adversarial_backward(net, [r3f, freelb], loss_fn)
    _freelb_r3f_reference(ref, ids, y, **kw)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12), name
    without = Net()  # and the regulariser matters: plain FreeLB differs
    freelb2 = FreeLB(without, adv_lr=0.1, adv_steps=2, adv_init_mag=0.6, embedding="emb",
                     generator=torch.Generator().manual_seed(kw["seed_freelb"]))
    adversarial_backward(without, [freelb2], lambda: F.cross_entropy(without(ids), y))
    assert float((without.head.weight.grad - ref.head.weight.grad).abs().max()) > 1e-6


@pytest.mark.parametrize("make", ["fgm", "awp", "pgd"])
@pytest.mark.parametrize("freelb_first", [True, False])
def test_weight_methods_with_freelb_run_at_delta0(make, freelb_first):
    """FGM/PGD/AWP passes (on weights above the embedding, so the embedding's own output is unchanged) see the
    embedding output of FreeLB's clean pass, E + delta0, exactly; before they saw E."""
    net = Net()
    ids, y = _batch()
    freelb = FreeLB(net, adv_steps=1, adv_init_mag=0.6, embedding="emb", generator=torch.Generator().manual_seed(0))
    other = {"fgm": lambda: FGM(net, epsilon=0.1, emb_name="hidden.weight"),
             "awp": lambda: AWP(net, adv_param="hidden.weight", adv_lr=0.1, adv_eps=0.01),
             "pgd": lambda: PGD(net, epsilon=0.1, alpha=0.05, steps=2, emb_name="hidden.weight")}[make]()
    seen = net.seen
    adversarial_backward(net, [freelb, other] if freelb_first else [other, freelb], lambda: F.cross_entropy(net(ids), y))
    n_freelb = 1
    n_other = len(seen) - 1 - n_freelb
    others = seen[1 + n_freelb:] if freelb_first else seen[1:1 + n_other]
    assert others and all(torch.equal(o, seen[0]) for o in others)


def test_freelb_delta0_gradient_ignores_other_passes():
    """Another method's passes treat delta0 as a constant: [FGM, FreeLB] equals FreeLB's ascent from the clean
    gradient alone (FGM's backward runs before FreeLB reads delta0's gradient)."""
    ids, y = _batch()
    grads = {}
    for order in ("fgm_first", "freelb_first"):
        net = Net()
        freelb = FreeLB(net, adv_steps=1, adv_init_mag=0.6, embedding="emb", generator=torch.Generator().manual_seed(0))
        fgm = FGM(net, epsilon=0.1, emb_name="hidden.weight")
        adversarial_backward(net, [fgm, freelb] if order == "fgm_first" else [freelb, fgm], lambda: F.cross_entropy(net(ids), y))
        grads[order] = [p.grad.clone() for p in net.parameters()]
    for a, b in zip(grads["fgm_first"], grads["freelb_first"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 2. AWP with R3F/SMART: refused (the regulariser's gradient would be replaced)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", ["r3f", "smart"])
def test_awp_with_regulariser_is_refused(reg):
    net = Net()
    method = R3F(net, embedding="emb") if reg == "r3f" else SMART(net, embedding="emb")
    with pytest.raises(ValueError, match=r"AWP replaces .*dropped silently"):
        adversarial_backward(net, [AWP(net), method], lambda: net(_batch()[0]).sum())
    callbacks = [AWPCallback(), R3FCallback(embedding="model.embeddings.word_embeddings") if reg == "r3f"
                 else SMARTCallback(embedding="model.embeddings.word_embeddings")]
    with pytest.raises(ValueError, match=r"dropped silently"):
        trainer(max_steps=1, callbacks=callbacks).fit(LogitsText(), loader(make_data(8)))


# ---------------------------------------------------------------------------------------------------------------
# 3. Every way a step ends leaves the model as plain Lightning would
# ---------------------------------------------------------------------------------------------------------------

EMB = "model.embeddings.word_embeddings"
ALL = {
    "fgm": lambda: FGMCallback(epsilon=0.5),
    "pgd": lambda: PGDCallback(epsilon=0.5, alpha=0.2, steps=2),
    "awp": lambda: AWPCallback(adv_lr=0.5, adv_eps=0.01),
    "freelb": lambda: FreeLBCallback(adv_steps=2, adv_init_mag=0.6, embedding=EMB),
    "r3f": lambda: R3FCallback(eps=1e-2, embedding=EMB),
    "smart": lambda: SMARTCallback(embedding=EMB),
    "neftune": lambda: NEFTuneCallback(embedding=EMB),
}


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def assert_left_clean(module: L.LightningModule) -> None:
    assert "training_step" not in vars(module)
    assert _hooks(module) == 0
    ids = make_data(4, seed=5).tensors[0]
    with torch.no_grad():
        assert torch.equal(module.model(ids), module.model(ids))


class Skips(LogitsText):
    """Ends the epoch early at batch 1 with Lightning's documented -1."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        return -1 if batch_idx == 1 else None


class Raises(LogitsText):
    """Raises in batch 1: in an adversarial pass, or (``clean``: a method without passes) in the clean step."""

    def __init__(self, error: BaseException, clean: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error, self.calls, self.clean = error, 0, clean

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls += 1
        if batch_idx == 1 and (self.clean or lightning_adv.in_adversarial_pass(self)):
            raise self.error
        return super().training_step(batch, batch_idx)


class Stops(LogitsText):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx == 1:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("name", list(ALL))
def test_skipped_batch_leaves_no_hook(name):
    """Before: FreeLB's hook stayed armed after fit (first forward after fit differed from the second by 7e-3), and
    R3F left its hook and its training_step wrapper on the module."""
    module = Skips()
    trainer(max_epochs=1, callbacks=[ALL[name]()]).fit(module, loader(make_data(16)))
    assert_left_clean(module)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_in_an_adversarial_pass_leaves_model_clean(name, error):
    module = Raises(error, clean=name == "neftune")
    before = copy.deepcopy(module.model)
    t = trainer(max_epochs=1, callbacks=[ALL[name]()])
    with pytest.raises((RuntimeError, KeyboardInterrupt, SystemExit)):
        t.fit(module, loader(make_data(16)))
    if module.calls <= 2 and name in ("r3f", "smart"):
        pytest.skip("no adversarial pass ran")  # pragma: no cover
    assert_left_clean(module)
    assert max_diff(module.model, before) > 0  # one step was taken; the failing one left the weights restored
    assert module.model.embeddings.word_embeddings.weight.grad is None or True


@pytest.mark.parametrize("name", list(ALL))
def test_should_stop_and_max_steps_mid_accumulation_leave_model_clean(name):
    module = Stops()
    trainer(max_epochs=2, callbacks=[ALL[name]()]).fit(module, loader(make_data(16)))
    assert_left_clean(module)
    module = LogitsText()
    trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[ALL[name]()]).fit(module, loader(make_data(32)))
    assert_left_clean(module)


def test_awp_weights_restored_when_pass_raises():
    """The exception flies out of AWP's pass: the weights are the ones before the attack, exactly."""
    module = Raises(RuntimeError("boom"))
    snapshots: List[Dict[str, torch.Tensor]] = []

    class Snap(L.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            snapshots.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=1, callbacks=[Snap(), AWPCallback(adv_lr=1.0, adv_eps=0.5)]).fit(module, loader(make_data(16)))
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshots[-1].items())


# ---------------------------------------------------------------------------------------------------------------
# 4. An embedding module the forward never calls: the same clear error for R3F, FreeLB and SMART
# ---------------------------------------------------------------------------------------------------------------


class EmbedsItself(LogitsText):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        ids, y = batch
        e = F.embedding(ids, self.model.embeddings.word_embeddings.weight)  # inputs_embeds: the module is not called
        logits = self.model.head(torch.tanh(self.model.hidden(e.mean(1))))
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


@pytest.mark.parametrize("name", ["r3f", "freelb", "smart"])
def test_uncalled_embedding_raises(name):
    """Before: R3F silently did nothing (logged divergence -2.98e-08)."""
    with pytest.raises(RuntimeError, match=r"was not called by the step's forward"):
        trainer(max_steps=1, callbacks=[ALL[name]()]).fit(EmbedsItself(), loader(make_data(8)))


# ---------------------------------------------------------------------------------------------------------------
# 5. Two callbacks of one class log under distinct keys
# ---------------------------------------------------------------------------------------------------------------


def test_two_fgms_log_distinct_keys():
    """Before: both logged adv/fgm_loss and Lightning averaged them (attacks 8 and 4 logged as 6.0)."""
    word = FGMCallback(epsilon=0.5, emb_name="word_embeddings")
    hidden = FGMCallback(epsilon=0.5, emb_name="hidden.weight", start_epoch=1)
    t = trainer(max_epochs=2, callbacks=[word, hidden])
    t.fit(TextModule(), loader(make_data(16)))
    metrics = t.callback_metrics
    assert "adv/fgm_loss" not in metrics and "adv/fgm_attacks" not in metrics
    assert float(metrics["adv/fgm_word_embeddings_attacks"]) == 8 == word.attacks
    assert float(metrics["adv/fgm_hidden_weight_attacks"]) == 4 == hidden.attacks
    assert "adv/fgm_word_embeddings_loss" in metrics and "adv/fgm_hidden_weight_loss" in metrics
    single = FGMCallback(epsilon=0.5)
    t = trainer(max_epochs=1, callbacks=[single])
    t.fit(TextModule(), loader(make_data(8)))
    assert float(t.callback_metrics["adv/fgm_attacks"]) == 2  # one callback of a kind keeps the short key


# ---------------------------------------------------------------------------------------------------------------
# 6. Fabric with mixed precision: every method
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", ["fgm", "pgd", "awp", "freelb", "r3f", "smart"])
def test_fabric_mixed_precision_every_method(precision, name):
    """Before: SMART crashed under Fabric mixed precision (torch.autograd.grad tripped Fabric's backward guard)."""
    from lightning.fabric import Fabric
    from lightning_adv.fabric import adversarial_backward as fabric_backward

    if precision == "16-mixed":  # real fp16 with a GradScaler on the CPU (the flag alone becomes bf16 there)
        from lightning.fabric.plugins.precision import MixedPrecision

        fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    else:
        fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    torch.manual_seed(0)
    net = Net().float()
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    method = {
        "fgm": lambda: FGM(model, epsilon=0.5, emb_name="emb.weight"),
        "pgd": lambda: PGD(model, epsilon=0.5, alpha=0.2, steps=2, emb_name="emb.weight"),
        "awp": lambda: AWP(model, adv_lr=0.5, adv_eps=0.01),
        "freelb": lambda: FreeLB(model, adv_steps=2, embedding="emb"),
        "r3f": lambda: R3F(model, eps=1e-2, embedding="emb"),
        "smart": lambda: SMART(model, embedding="emb"),
    }[name]()
    ids, y = _batch()
    before = copy.deepcopy(net)

    def loss_fn():
        logits = model(ids)
        return {"loss": F.cross_entropy(logits.float(), y), "logits": logits}

    for _ in range(3):
        loss, (outcome,) = fabric_backward(fabric, model, [method], loss_fn)
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert outcome.loss is not None and bool(torch.isfinite(outcome.loss))
    assert max_diff(net, before) > 0


# ---------------------------------------------------------------------------------------------------------------
# 7. Resume equals an uninterrupted run, for the methods that draw noise
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["freelb", "smart", "r3f"])
def test_resume_equals_uninterrupted(name, tmp_path):
    """Before: 1.4e-3 (FreeLB), 6.4e-5 (SMART), 4.7e-7 (R3F) apart: the noise came from the global random state."""
    data = make_data(16)
    make = {"freelb": lambda: FreeLBCallback(adv_steps=1, adv_init_mag=0.6, embedding=EMB),
            "smart": lambda: SMARTCallback(noise_var=1e-2, embedding=EMB),
            "r3f": lambda: R3FCallback(eps=1e-1, embedding=EMB)}[name]
    L.seed_everything(7)
    straight = LogitsText()
    trainer(max_epochs=2, callbacks=[make()]).fit(straight, loader(data))

    L.seed_everything(7)
    first = LogitsText()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[make(), ckpt], enable_checkpointing=True).fit(first, loader(data))
    torch.manual_seed(12345)  # the global state is not what the uninterrupted run had: it must not matter
    resumed = LogitsText()
    cb = make()
    trainer(max_epochs=2, callbacks=[cb], enable_checkpointing=False).fit(resumed, loader(data), ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb.attacks == 8
    assert max_diff(straight.model, resumed.model) == 0.0
    other = LogitsText()  # and the noise matters: another seed gives another run
    trainer(max_epochs=2, callbacks=[make().__class__(**{**vars_of(make()), "seed": 99})]).fit(other, loader(data))
    assert max_diff(straight.model, other.model) > 0


def vars_of(cb: Any) -> Dict[str, Any]:
    import inspect

    names = inspect.signature(type(cb).__init__).parameters
    return {n: getattr(cb, n) for n in names if n != "self" and hasattr(cb, n)}


def test_seed_argument_and_seed_everything():
    data = make_data(8)
    runs = []
    for seed in (None, None, 3):
        L.seed_everything(5)
        module = LogitsText()
        trainer(max_epochs=1, callbacks=[R3FCallback(eps=1e-1, embedding=EMB, seed=seed)]).fit(module, loader(data))
        runs.append(module.model)
    assert max_diff(runs[0], runs[1]) == 0.0
    assert max_diff(runs[0], runs[2]) > 0


# ---------------------------------------------------------------------------------------------------------------
# 8. Messages
# ---------------------------------------------------------------------------------------------------------------


def test_numpy_scalars_are_accepted():
    cb = FGMCallback(epsilon=np.float32(0.5), start_epoch=np.int64(0))
    FreeLBCallback(adv_lr=np.float64(0.1), adv_steps=np.int64(3))
    AWPCallback(adv_lr=np.float32(1.0), adv_step=np.int32(2))
    RobustAccuracy(epsilon=[np.float32(0.5), 1.0], steps=np.int64(2))
    module = TextModule()
    trainer(max_steps=1, callbacks=[cb]).fit(module, loader(make_data(8)))
    assert cb.attacks == 1
    with pytest.raises(ValueError, match=r"adv_steps must be an integer >= 1"):
        FreeLBCallback(adv_steps=np.int64(0))


class OneLogit(TextModule):
    def robust_forward(self, batch):
        ids, y = batch
        return self.model(ids)[:, :1], y

    def validation_step(self, batch, batch_idx):
        pass


def test_robust_accuracy_one_logit_says_what_it_supports():
    """Before: it asked for num_classes=1 and then refused it."""
    t = trainer(limit_val_batches=1, callbacks=[RobustAccuracy(epsilon=0.1, num_classes=2, embedding=EMB)])
    with pytest.raises(ValueError, match=r"one score per example.*torch.zeros_like\(z\), z"):
        t.validate(OneLogit(), loader(make_data(8)))


def test_robust_accuracy_empty_embedding_refused():
    with pytest.raises(ValueError, match=r"embedding=''"):
        RobustAccuracy(embedding="")


class NoGradEmbedding(LogitsText):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        ids, y = batch
        with torch.no_grad():
            e = self.model.embeddings.word_embeddings(ids)
        logits = self.model.head(torch.tanh(self.model.hidden(e.mean(1))))
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


def test_smart_no_grad_embedding_is_explained():
    """Before: torch's raw 'One of the differentiated Tensors appears to not have been used in the graph'."""
    with pytest.raises(RuntimeError, match=r"SMART: the logits do not depend on the output of the embedding module.*no_grad"):
        trainer(max_steps=1, callbacks=[SMARTCallback(embedding=EMB)]).fit(NoGradEmbedding(), loader(make_data(8)))


@pytest.mark.parametrize("make", [lambda m: FreeLB(m, embedding="emb"), lambda m: R3F(m, embedding="emb"),
                                  lambda m: SMART(m, embedding="emb")])
def test_two_line_form_refused_by_name_for_embedding_output_methods(make):
    net = Net()
    method = make(net)
    ids, y = _batch()
    F.cross_entropy(net(ids), y).backward()
    name = type(method).__name__
    with pytest.raises(RuntimeError, match=rf"{name}.attack_backward: {name} perturbs the embedding output .*adversarial_backward"):
        method.attack_backward(lambda: F.cross_entropy(net(ids), y))


# ---------------------------------------------------------------------------------------------------------------
# 9. Smaller points
# ---------------------------------------------------------------------------------------------------------------


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input=ids).mean(1))


def test_keyword_called_embedding_keeps_padding_unperturbed():
    """Before: delta0 landed on padding positions when the module was called with keyword arguments."""
    torch.manual_seed(0)
    net = KeywordCall()
    ids, y = _batch()
    freelb = FreeLB(net, adv_steps=1, adv_init_mag=1.0, embedding="emb")
    seen = _recorder(net.emb)
    adversarial_backward(net, [freelb], lambda: F.cross_entropy(net(ids), y))
    delta0 = seen[0] - net.emb(ids).detach()
    assert float(delta0[0, -2:].abs().max()) == 0.0 and float(delta0[0, :-2].abs().max()) > 0


def test_two_freelbs_on_one_module_refused():
    module = LogitsText()
    module.alias = module.model.embeddings.word_embeddings
    callbacks = [FreeLBCallback(embedding=EMB), FreeLBCallback(embedding="alias")]
    with pytest.raises(ValueError, match=r"two FreeLB methods perturb the same module"):
        trainer(max_steps=1, callbacks=callbacks).fit(module, loader(make_data(8)))


def test_counters_restart_with_each_fit():
    cb = FGMCallback(epsilon=0.5)
    trainer(max_epochs=1, callbacks=[cb]).fit(TextModule(), loader(make_data(16)))
    assert cb.attacks == 4
    trainer(max_epochs=1, callbacks=[cb]).fit(TextModule(), loader(make_data(8)))
    assert cb.attacks == 2  # a new fit (not a resume) counts its own attacks


@pytest.mark.parametrize("name", list(ALL))
def test_every_callback_takes_start_step(name):
    cb = type(ALL[name]())(**{**vars_of(ALL[name]()), "start_step": 3})
    t = trainer(max_epochs=1, callbacks=[cb])
    t.fit(LogitsText(), loader(make_data(20)))
    assert cb.attacks == 2  # steps 3 and 4 of 0..4


def test_driver_is_registered_once_and_removed_after_fit():
    from lightning_adv.callbacks.coordinator import Coordinator

    callbacks = [FGMCallback(epsilon=0.5), AWPCallback(adv_lr=0.5, adv_eps=0.01)]
    t = trainer(max_epochs=1, callbacks=callbacks)
    seen = []

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append([cb for cb in trainer.callbacks if isinstance(cb, Coordinator)])

    t.callbacks.append(Look())
    t.fit(TextModule(), loader(make_data(8)))
    assert len(seen[0]) == 1 and seen[0][0].callbacks == []  # emptied at teardown
    assert Coordinator.of(t) is None
    assert all(cb.attacks == 2 for cb in callbacks)


# ---------------------------------------------------------------------------------------------------------------
# Issue 18, point 4: after the step no gradient-sized buffer is held besides .grad
# ---------------------------------------------------------------------------------------------------------------


def _gradient_sized(net: nn.Module) -> set:
    """Python-visible tensors of the embedding weight's shape, other than the weight and its .grad."""
    import gc

    gc.collect()
    weight = net.emb.weight
    mine = {id(weight), id(weight.grad)}
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in mine
            and tuple(o.shape) == tuple(weight.shape)}


COMBOS = {
    "fgm": lambda n: [FGM(n, epsilon=0.1, emb_name="emb.weight")],
    "pgd": lambda n: [PGD(n, epsilon=0.1, alpha=0.05, steps=2, emb_name="emb.weight")],
    "awp": lambda n: [AWP(n, adv_lr=0.1, adv_eps=0.01)],
    "freelb": lambda n: [FreeLB(n, embedding="emb")],
    "r3f": lambda n: [R3F(n, eps=1e-2, embedding="emb")],
    "smart": lambda n: [SMART(n, embedding="emb")],
    "fgm+awp": lambda n: [FGM(n, epsilon=0.1, emb_name="emb.weight"), AWP(n, adv_lr=0.1, adv_eps=0.01)],
    "awp+fgm": lambda n: [AWP(n, adv_lr=0.1, adv_eps=0.01), FGM(n, epsilon=0.1, emb_name="emb.weight")],
    "freelb+fgm": lambda n: [FreeLB(n, embedding="emb"), FGM(n, epsilon=0.1, emb_name="emb.weight")],
    "pgd+freelb": lambda n: [PGD(n, epsilon=0.1, alpha=0.05, steps=2, emb_name="emb.weight"), FreeLB(n, embedding="emb")],
    "r3f+smart+freelb": lambda n: [R3F(n, eps=1e-2, embedding="emb"), SMART(n, embedding="emb"), FreeLB(n, embedding="emb")],
    "freelb+awp": lambda n: [FreeLB(n, embedding="emb"), AWP(n, adv_lr=0.1, adv_eps=0.01)],
}


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("accumulated", [False, True])
def test_no_gradient_sized_buffer_outlives_the_step(combo, accumulated):
    """Before: AttackStep._clean kept the clean gradient (a gradient-sized copy) after after_backward, through the
    final backward and optimizer.step, for every composition that moves the clean gradient aside."""
    from lightning_adv.core import AttackStep
    from lightning_adv.core.step import pass_output

    net = Net()
    ids, y = _batch()

    def loss_fn():
        logits = net(ids)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    if accumulated:  # an earlier micro-batch's gradient in .grad
        F.cross_entropy(net(ids), y).backward()
    before = _gradient_sized(net)  # other tests' tensors, still alive
    _held = lambda net: len(_gradient_sized(net) - before)  # noqa: E731
    step = AttackStep(list(net.parameters()), COMBOS[combo](net), loss_fn)
    step.before_forward()
    out = loss_fn()
    step.before_backward(out)
    joined = step.take_joined()
    (out["loss"] if joined is None else out["loss"] + joined).backward()
    del out, joined
    step.after_backward()
    assert _held(net) == 0
    step.close()
    assert _held(net) == 0
    assert net.emb.weight.grad is not None


def test_two_replacing_methods_are_refused():
    """Before: [AWP(weight), AWP(bias)] kept only the last replacement; the first AWP's passes were paid and dropped."""
    from lightning_adv.core import SAM

    net = Net()
    ids, y = _batch()
    for methods in ([AWP(net, adv_param="hidden.weight"), AWP(net, adv_param="head.weight")], [AWP(net), SAM(net)]):
        with pytest.raises(ValueError, match=r"all replace the micro-batch's clean gradient.*dropped silently"):
            adversarial_backward(net, methods, lambda: F.cross_entropy(net(ids), y))
