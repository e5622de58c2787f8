"""PGD and FreeLB against plain-PyTorch loops written from their reference sources, their composition with FGM
and AWP, and the callbacks (and the mixin) against the same loops with the same optimizer.

References, re-written here from the sources (not copied):
- PGD: the competition snippet (fyubang's "adversarial-train", bert4torch ``callbacks.py``): clean gradients
  backed up; ``steps`` passes, each ``W += alpha * g / ||g||`` (skipped when the norm is 0 or nan) projected onto
  the ball ``||W - W0|| <= epsilon``; gradients discarded between passes, the clean ones put back before the last
  backward; weights restored.
- FreeLB: ``freelb_train_step`` of zhuchen03/FreeLB (``fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py``).
"""

from __future__ import annotations

import contextlib
import copy
import types
from typing import Any, Callable, List, Optional

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from helpers import CLASSES, DIM, VOCAB, ManualText, TextModule, TinyText, loader, make_data, max_diff, trainer
from lightning_adv import AWPCallback, FGMCallback, FreeLBCallback, PGDCallback
from lightning_adv.core import AWP, FGM, PGD, FreeLB, adversarial_backward
from lightning_adv.core.step import AttackStep
from reference_snippets import RefAWP, RefFGM

ce = nn.functional.cross_entropy
ATOL = 1e-12


def _force_device_side(monkeypatch):
    import lightning_adv.core.snapshot as snapshot

    monkeypatch.setattr(snapshot, "on_host", lambda tensors: False)


def _grads(model: nn.Module) -> List[Optional[torch.Tensor]]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _weights(model: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(got, expected, atol=ATOL):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            err = float((a - b).abs().max())
            assert err <= atol, err


def _batch(b: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g), torch.randint(0, CLASSES, (b,), generator=g)


# ----------------------------------------------------------------------------------------------------------------
# The reference loops
# ----------------------------------------------------------------------------------------------------------------


def ref_pgd(model: nn.Module, loss_fn: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None], *,
            epsilon: float, alpha: float, steps: int, emb_name: str, stats: Optional[dict] = None) -> float:
    """The competition PGD; ``.grad`` holds the clean gradient on entry, clean + last pass's on exit."""
    grad_backup = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    emb_backup = {}
    loss = None
    for t in range(steps):
        for name, param in model.named_parameters():
            if param.requires_grad and emb_name in name:
                if t == 0:
                    emb_backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(alpha * param.grad / norm)
                    r = param.data - emb_backup[name]
                    if torch.norm(r) > epsilon:
                        r = epsilon * r / torch.norm(r)
                        if stats is not None:
                            stats["projections"] = stats.get("projections", 0) + 1
                    param.data = emb_backup[name] + r
                elif stats is not None:
                    stats["zero_norm"] = stats.get("zero_norm", 0) + 1
        if t != steps - 1:
            model.zero_grad()
        else:
            for name, param in model.named_parameters():
                if name in grad_backup:
                    param.grad = grad_backup[name]
        loss = loss_fn()
        backward(loss)
    for name, param in model.named_parameters():
        if name in emb_backup:
            param.data = emb_backup[name]
    return float(loss.detach())


def tiny_text_logits(model: TinyText, embeds: torch.Tensor) -> torch.Tensor:
    """TinyText.forward from its embedding output."""
    return model.head(torch.tanh(model.hidden(embeds.mean(dim=1))))


def ref_freelb(model: TinyText, ids: torch.Tensor, y: torch.Tensor, backward: Callable[[torch.Tensor], None], *,
               adv_lr: float, adv_steps: int, adv_max_norm: float, norm_type: str, delta0: Optional[torch.Tensor] = None,
               ctx: Callable[[], Any] = contextlib.nullcontext, logits_fn=tiny_text_logits,
               embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, weight_clean_after: bool = False) -> float:
    """``freelb_train_step`` (no regulariser, no yopo, ``grad_square`` off): the clean pass at ``delta0`` (0 when
    ``None``) and ``adv_steps`` ascent passes, every loss divided by ``1 + adv_steps``. Returns the last pass's loss.

    ``weight_clean_after``: backpropagate the clean loss unweighted and multiply the parameters' gradients by
    ``1 / (1 + adv_steps)`` afterwards (``.grad`` must hold this pass only), as the library must (the clean backward
    is Lightning's); the same in exact arithmetic, it rounds differently when the backward runs in bf16."""
    embed = embed or model.embeddings.word_embeddings
    k = adv_steps
    with ctx():
        embeds_init = embed(ids)
        if delta0 is not None:
            delta = delta0.clone().detach().requires_grad_()
            loss = ce(logits_fn(model, embeds_init + delta), y)
        else:
            delta = 0
            embeds_init.retain_grad()
            loss = ce(logits_fn(model, embeds_init), y)
    if weight_clean_after:
        backward(loss)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / (1 + k))
    else:
        backward(loss / (1 + k))
    delta_grad = (delta.grad if delta0 is not None else embeds_init.grad).clone().detach()
    for _ in range(k):
        if norm_type == "l2":
            denorm = torch.clamp(torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1), min=1e-10)
            delta = (delta + adv_lr * delta_grad / denorm).detach()
            if adv_max_norm > 0:
                delta_norm = torch.norm(delta.view(delta.size(0), -1).float(), p=2, dim=1).to(embeds_init).detach()
                exceed = (delta_norm > adv_max_norm).to(embeds_init)
                delta = delta * (adv_max_norm / delta_norm * exceed + (1 - exceed)).view(-1, 1, 1).detach()
        else:
            denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1, p=float("inf")).view(-1, 1, 1)
            denorm = torch.clamp(denorm, min=1e-8)
            delta = (delta + adv_lr * delta_grad / denorm).detach()
            if adv_max_norm > 0:
                delta = torch.clamp(delta, -adv_max_norm, adv_max_norm).detach()
        delta.requires_grad_()
        with ctx():
            loss = ce(logits_fn(model, embed(ids) + delta), y)
        backward(loss / (1 + k))
        delta_grad = delta.grad.clone().detach()
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------------------------
# 1. PGD
# ----------------------------------------------------------------------------------------------------------------

PGD_CASES = {
    # name: (kwargs, batch shape). (3, 4): at most 12 of 40 rows touched, the CPU saves rows; (8, 5): dense.
    "k1": (dict(epsilon=1.0, alpha=0.3, steps=1), (3, 4)),
    "k3": (dict(epsilon=1.0, alpha=0.3, steps=3), (3, 4)),
    "k3_dense": (dict(epsilon=1.0, alpha=0.3, steps=3), (8, 5)),
    "k3_projected": (dict(epsilon=0.25, alpha=0.2, steps=3), (3, 4)),
    "k3_projected_dense": (dict(epsilon=0.25, alpha=0.2, steps=3), (8, 5)),
}


def _pgd_pair(kwargs, shape, api="adversarial_backward", seed=0, model_cls=TinyText, emb_name="word_embeddings"):
    torch.manual_seed(seed)
    model = model_cls().double()
    reference = copy.deepcopy(model)
    ids, y = _batch(*shape, seed=seed)

    before = _weights(model)
    pgd = PGD(model, emb_name=emb_name, **kwargs)
    loss_fn = lambda: ce(model(ids), y)  # noqa: E731
    if api == "adversarial_backward":
        (outcome,) = adversarial_backward(model, [pgd], loss_fn)
        loss, skipped = outcome.loss, outcome.skipped
    else:
        loss_fn().backward()
        loss = pgd.attack_backward(loss_fn)
        skipped = pgd.last_skipped
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))  # restored exactly
    assert not bool(skipped) and pgd.saved_bytes() == 0

    stats: dict = {}
    ref_loss_fn = lambda: ce(reference(ids), y)  # noqa: E731
    ref_loss_fn().backward()
    ref_loss = ref_pgd(reference, ref_loss_fn, lambda l: l.backward(), emb_name=emb_name, stats=stats, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_weights(reference), before))
    return _grads(model), _grads(reference), float(loss), ref_loss, stats


@pytest.mark.parametrize("branch", ["host", "device"])
@pytest.mark.parametrize("case", sorted(PGD_CASES))
def test_pgd_equals_reference(case, branch, monkeypatch):
    if branch == "device":
        _force_device_side(monkeypatch)
    kwargs, shape = PGD_CASES[case]
    got, expected, loss, ref_loss, stats = _pgd_pair(kwargs, shape)
    _assert_close(got, expected)
    assert abs(loss - ref_loss) <= ATOL
    # the projection is active exactly in the small-epsilon cases (every pass after the first: 0.2 * 2 > 0.25)
    assert ("projections" in stats) == ("projected" in case)
    if "projected" in case:
        assert stats["projections"] == kwargs["steps"] - 1


def test_pgd_attack_backward_equals_reference():
    kwargs, shape = PGD_CASES["k3_projected"]
    got, expected, loss, ref_loss, _ = _pgd_pair(kwargs, shape, api="attack_backward")
    _assert_close(got, expected)
    assert abs(loss - ref_loss) <= ATOL


@pytest.mark.parametrize("case", ["k3", "k3_dense", "k3_projected"])
def test_pgd_device_side_equals_host_side(case, monkeypatch):
    kwargs, shape = PGD_CASES[case]
    host, _, host_loss, _, _ = _pgd_pair(kwargs, shape, seed=3)
    _force_device_side(monkeypatch)
    device, _, device_loss, _, _ = _pgd_pair(kwargs, shape, seed=3)
    _assert_close(device, host)
    assert abs(host_loss - device_loss) <= ATOL


class TwoEmbeddings(TinyText):
    """A second matched embedding whose gradient is exactly zero (its output is multiplied by 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings.word_embeddings_unused = nn.Embedding(VOCAB, DIM)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings.word_embeddings(ids).mean(dim=1) + 0.0 * self.embeddings.word_embeddings_unused(ids).mean(dim=1)
        return self.head(torch.tanh(self.hidden(h)))


@pytest.mark.parametrize("branch", ["host", "device"])
def test_pgd_zero_gradient_parameter_is_left_alone(branch, monkeypatch):
    if branch == "device":
        _force_device_side(monkeypatch)
    kwargs = dict(epsilon=0.25, alpha=0.2, steps=3)
    got, expected, loss, ref_loss, stats = _pgd_pair(kwargs, (3, 4), model_cls=TwoEmbeddings)
    _assert_close(got, expected)
    assert abs(loss - ref_loss) <= ATOL
    assert stats["zero_norm"] == 3  # the reference skipped the zero-gradient parameter in every pass
    names = [n for n, _ in TwoEmbeddings().named_parameters()]
    unused = got[names.index("embeddings.word_embeddings_unused.weight")]
    assert unused is not None and torch.count_nonzero(unused) == 0


# ----------------------------------------------------------------------------------------------------------------
# 2. FreeLB
# ----------------------------------------------------------------------------------------------------------------


def _freelb_pair(norm_type, max_norm, steps, *, adv_lr=0.3, shape=(4, 5), seed=0, earlier=False):
    torch.manual_seed(seed)
    model = TinyText().double()
    reference = copy.deepcopy(model)
    ids, y = _batch(*shape, seed=seed)
    before = _weights(model)
    with torch.no_grad():
        clean_logits = model(ids)

    pre = None
    if earlier:  # gradients of an earlier micro-batch: kept, not scaled by 1 / (1 + K)
        other_ids, other_y = _batch(*shape, seed=seed + 100)
        ce(model(other_ids), other_y).backward()
        pre = _grads(model)

    freelb = FreeLB(model, adv_lr=adv_lr, adv_steps=steps, adv_init_mag=0.0, adv_max_norm=max_norm, norm_type=norm_type,
                    embedding="embeddings.word_embeddings")
    (outcome,) = adversarial_backward(model, [freelb], lambda: ce(model(ids), y))
    assert not bool(outcome.skipped)
    assert freelb.target.calls == 1 + steps
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))
    with torch.no_grad():  # the hook is gone
        assert torch.equal(model(ids), clean_logits)

    ref_loss = ref_freelb(reference, ids, y, lambda l: l.backward(), adv_lr=adv_lr, adv_steps=steps,
                          adv_max_norm=max_norm, norm_type=norm_type)
    expected = _grads(reference)
    if pre is not None:
        expected = [e + p for e, p in zip(expected, pre)]
    return _grads(model), expected, float(outcome.loss), ref_loss


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("max_norm", [0.0, 0.2])
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_freelb_equals_reference(norm_type, max_norm, steps):
    got, expected, loss, ref_loss = _freelb_pair(norm_type, max_norm, steps)
    _assert_close(got, expected)
    assert abs(loss - ref_loss) <= ATOL


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_freelb_max_norm_is_active(norm_type):
    """The bound of the cases above changes the result (adv_lr 0.3 > max_norm 0.2)."""
    bounded, _, _, _ = _freelb_pair(norm_type, 0.2, 2)
    free, _, _, _ = _freelb_pair(norm_type, 0.0, 2)
    assert max(float((a - b).abs().max()) for a, b in zip(bounded, free)) > 1e-6


def test_freelb_keeps_earlier_gradients_unscaled():
    got, expected, _, _ = _freelb_pair("l2", 0.2, 2, earlier=True)
    _assert_close(got, expected)


class PaddedText(nn.Module):
    """A transformers-like model: get_input_embeddings(), a config with pad_token_id, masked mean pooling."""

    def __init__(self, pad_token_id: Optional[int] = None, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(pad_token_id=pad_token_id)
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.head = nn.Linear(DIM, CLASSES)
        self.pad = pad_token_id if pad_token_id is not None else padding_idx

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return padded_logits(self, self.embed(ids), ids)


def padded_logits(model: PaddedText, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    mask = (ids != model.pad).unsqueeze(2).to(embeds.dtype)
    return model.head(torch.tanh((embeds * mask).sum(1) / mask.sum(1).clamp_min(1)))


def _padded_batch(pad: int, b: int = 64, t: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    ids[ids == pad] = (pad + 1) % VOCAB
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    ids[torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)] = pad  # right padding
    return ids, torch.randint(0, CLASSES, (b,), generator=g), lengths


def _delta0(model: nn.Module, freelb: FreeLB, ids: torch.Tensor, seed: int):
    """The clean pass's perturbation (read between the clean forward and the end of the micro-batch)."""
    step = AttackStep(list(model.parameters()), [freelb], lambda: None)
    try:
        step.before_forward()
        torch.manual_seed(seed)
        model(ids)
        return freelb.target.delta.detach().clone(), freelb.target.mask.clone()
    finally:
        step.close()


@pytest.mark.parametrize("source", ["config", "padding_idx"])
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_freelb_initial_perturbation(norm_type, source):
    pad = 3 if source == "config" else 0
    model = PaddedText(pad_token_id=pad) if source == "config" else PaddedText(padding_idx=pad)
    model = model.double()
    mag = 0.6
    freelb = FreeLB(model, adv_init_mag=mag, norm_type=norm_type)  # the embedding found by get_input_embeddings()
    assert freelb.target.module is model.embed and freelb.target.pad_id == pad
    ids, _, lengths = _padded_batch(pad)
    delta, mask = _delta0(model, freelb, ids, seed=5)
    assert delta.dtype == torch.float64 and delta.shape == (*ids.shape, DIM)
    assert torch.equal(mask, ids != pad)
    assert torch.count_nonzero(delta[ids == pad]) == 0  # padding positions exactly 0
    real = delta[ids != pad]
    assert torch.count_nonzero(real) == real.numel()

    # the reference draw, with the same generator state
    torch.manual_seed(5)
    if norm_type == "l2":
        noise = torch.zeros_like(delta).uniform_(-1, 1) * mask.unsqueeze(2).to(delta)
        bound = mag / torch.sqrt(lengths.to(delta) * DIM)
        expected = noise * bound.view(-1, 1, 1)
        assert torch.equal(delta, expected)
        assert bool((delta.abs() <= bound.view(-1, 1, 1)).all())
        assert bool((delta.flatten(1).norm(dim=1) <= mag).all())
        ratio = delta.abs() / bound.view(-1, 1, 1)  # uniform in [0, 1] on the real tokens
        assert float(ratio[ids != pad].max()) > 0.99 and abs(float(ratio[ids != pad].mean()) - 0.5) < 0.03
    else:
        expected = torch.zeros_like(delta).uniform_(-mag, mag) * mask.unsqueeze(2).to(delta)
        assert torch.equal(delta, expected)
        assert float(delta.abs().max()) <= mag and float(delta.abs().max()) > 0.99 * mag


def test_freelb_config_pad_id_wins_over_padding_idx():
    model = PaddedText(pad_token_id=3, padding_idx=0).double()
    freelb = FreeLB(model, adv_init_mag=0.6)
    ids = torch.tensor([[5, 3, 0, 3]])
    delta, mask = _delta0(model, freelb, ids, seed=0)
    assert mask.tolist() == [[True, False, True, False]]
    assert torch.count_nonzero(delta[0, 1]) == 0 and torch.count_nonzero(delta[0, 2]) == DIM


@pytest.mark.parametrize("norm_type,max_norm", [("l2", 0.2), ("linf", 0.05), ("l2", 0.0)])
def test_freelb_random_start_equals_reference(norm_type, max_norm):
    """With adv_init_mag > 0, the whole step equals the reference drawing delta0 from the same generator state."""
    pad, mag, steps, adv_lr = 0, 0.1, 2, 0.05
    torch.manual_seed(1)
    model = PaddedText(padding_idx=pad).double()
    reference = copy.deepcopy(model)
    ids, y, lengths = _padded_batch(pad, b=4, t=6, seed=2)

    freelb = FreeLB(model, adv_lr=adv_lr, adv_steps=steps, adv_init_mag=mag, adv_max_norm=max_norm, norm_type=norm_type)
    torch.manual_seed(7)
    (outcome,) = adversarial_backward(model, [freelb], lambda: ce(model(ids), y))

    torch.manual_seed(7)
    mask = (ids != pad).unsqueeze(2).double()
    shape = (*ids.shape, DIM)
    if norm_type == "l2":
        delta0 = torch.zeros(shape, dtype=torch.float64).uniform_(-1, 1) * mask
        delta0 = delta0 * (mag / torch.sqrt(lengths.double() * DIM)).view(-1, 1, 1)
    else:
        delta0 = torch.zeros(shape, dtype=torch.float64).uniform_(-mag, mag) * mask
    ref_loss = ref_freelb(reference, ids, y, lambda l: l.backward(), adv_lr=adv_lr, adv_steps=steps, adv_max_norm=max_norm,
                          norm_type=norm_type, delta0=delta0, embed=reference.embed,
                          logits_fn=lambda m, e: padded_logits(m, e, ids))
    _assert_close(_grads(model), _grads(reference))
    assert abs(float(outcome.loss) - ref_loss) <= ATOL


# ----------------------------------------------------------------------------------------------------------------
# 3. Composition: every method from the same clean gradient
# ----------------------------------------------------------------------------------------------------------------

FGM_KW = dict(epsilon=0.7, emb_name="word_embeddings")
AWP_KW = dict(adv_param="weight", adv_lr=0.5, adv_eps=0.05, adv_step=2)
PGD_KW = dict(epsilon=0.25, alpha=0.2, steps=3, emb_name="word_embeddings")


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = None if g is None else g.clone()


def ref_method_grads(name: str, model: nn.Module, loss_fn, backward, clean: List[torch.Tensor]) -> List[torch.Tensor]:
    """``.grad`` after the reference method, run alone from ``clean``."""
    _set_grads(model, clean)
    if name == "fgm":
        fgm = RefFGM(model, **FGM_KW)
        fgm.attack()
        backward(loss_fn())
        fgm.restore()
    elif name == "awp":
        RefAWP(model, **AWP_KW).attack_backward(loss_fn, backward)
    else:
        ref_pgd(model, loss_fn, backward, **PGD_KW)
    return _grads(model)


def ref_composed(names, model, loss_fn, backward) -> float:
    """The composed micro-batch: ``.grad`` (this micro-batch's only) = base + every add-method's adversarial part,
    base = AWP's gradient if AWP runs, else the clean one."""
    backward(loss_fn())
    clean = _grads(model)
    base, parts = clean, []
    for name in names:
        grads = ref_method_grads(name, model, loss_fn, backward, clean)
        if name == "awp":
            base = grads
        else:
            parts.append([g - c for g, c in zip(grads, clean)])
    total = [sum(gs[1:], gs[0].clone()) for gs in zip(base, *parts)]
    _set_grads(model, total)
    with torch.no_grad():
        return float(loss_fn())


COMPOSED = {"fgm": lambda m: FGM(m, **FGM_KW), "awp": lambda m: AWP(m, **AWP_KW), "pgd": lambda m: PGD(m, **PGD_KW)}


@pytest.mark.parametrize("names", [("fgm", "awp"), ("awp", "fgm"), ("fgm", "pgd"), ("pgd", "fgm"), ("awp", "pgd")])
def test_composition_equals_sum_of_independent_attacks(names):
    torch.manual_seed(0)
    model = TinyText().double()
    reference = copy.deepcopy(model)
    ids, y = _batch(6, 5)
    before = _weights(model)
    outcomes = adversarial_backward(model, [COMPOSED[n](model) for n in names], lambda: ce(model(ids), y))
    assert [bool(o.skipped) for o in outcomes] == [False] * len(names)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))
    ref_composed(names, reference, lambda: ce(reference(ids), y), lambda l: l.backward())
    _assert_close(_grads(model), _grads(reference))
    # not vacuous: each method alone gives something else
    for n in names:
        alone = copy.deepcopy(reference)
        alone.zero_grad(set_to_none=True)
        adversarial_backward(alone, [COMPOSED[n](alone)], lambda: ce(alone(ids), y))
        assert max(float((a - b).abs().max()) for a, b in zip(_grads(alone), _grads(reference))) > 1e-6


# ----------------------------------------------------------------------------------------------------------------
# 4. Lightning: the callbacks and the mixin against a plain loop with the module's optimizer
# ----------------------------------------------------------------------------------------------------------------


def plain_fit(module: TextModule, batches, micro, *, epochs: int, accumulate: int = 1,
              autocast_dtype: Optional[torch.dtype] = None, scaler: Optional[torch.amp.GradScaler] = None) -> List[List[float]]:
    """Train ``module.model`` with ``micro(model, ids, y, ctx, backward) -> adversarial loss`` per micro-batch; earlier
    micro-batches' gradients set aside meanwhile. Returns the adversarial losses, per epoch."""
    model = module.model
    opt = module.configure_optimizers()
    params = list(model.parameters())

    def ctx():
        device = next(model.parameters()).device.type
        return torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def backward(loss: torch.Tensor) -> None:
        loss = loss / accumulate
        (scaler.scale(loss) if scaler else loss).backward()

    losses = []
    for _ in range(epochs):
        epoch = []
        for i, (ids, y) in enumerate(batches):
            earlier = [p.grad for p in params]
            for p in params:
                p.grad = None
            epoch.append(micro(model, ids, y, ctx, backward))
            for p, old in zip(params, earlier):
                if old is not None:
                    p.grad = old if p.grad is None else p.grad + old
            if (i + 1) % accumulate == 0:
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
        losses.append(epoch)
    return losses


def pgd_micro(**kw):
    def micro(model, ids, y, ctx, backward):
        def loss_fn():
            with ctx():
                return ce(model(ids), y)

        backward(loss_fn())
        return ref_pgd(model, loss_fn, backward, **kw)

    return micro


def freelb_micro(**kw):
    return lambda model, ids, y, ctx, backward: ref_freelb(model, ids, y, backward, ctx=ctx, **kw)


def composed_micro(names):
    def micro(model, ids, y, ctx, backward):
        return ref_composed(names, model, lambda: ce(model(ids), y), backward)

    return micro


LPGD = dict(epsilon=0.25, alpha=0.2, steps=3, emb_name="word_embeddings")
LFREELB = dict(adv_lr=0.3, adv_steps=2, adv_max_norm=0.2, norm_type="l2")


def _callback(method, **over):
    if method == "pgd":
        return PGDCallback(**dict(LPGD, **over))
    kw = dict(LFREELB, **over)
    return FreeLBCallback(adv_init_mag=0.0, embedding="model.embeddings.word_embeddings", **kw)


def _micro(method, **over):
    return pgd_micro(**dict(LPGD, **over)) if method == "pgd" else freelb_micro(**dict(LFREELB, **over))


def lightning_pair(method, *, epochs=2, accumulate=1, dtype=torch.float64, precision="64-true", plugins=None,
                   ref_autocast=None, scaler=None, manual=False, over=None, callbacks=None, micro=None):
    over = over or {}
    ds = make_data(16)
    module = ManualText(accumulate=accumulate, dtype=dtype) if manual else TextModule(dtype=dtype)
    reference = copy.deepcopy(module)
    cbs = callbacks if callbacks is not None else [_callback(method, **over)]
    extra = dict(plugins=plugins) if plugins else dict(precision=precision)
    trainer(max_epochs=epochs, callbacks=cbs, accumulate_grad_batches=1 if manual else accumulate, **extra).fit(module, loader(ds))
    losses = plain_fit(reference, list(loader(ds)), micro or _micro(method, **over), epochs=epochs, accumulate=accumulate,
                       autocast_dtype=ref_autocast, scaler=scaler)
    return module, reference, cbs, losses


def _check_logged(module, method, losses, divisor=1.0, atol=1e-6):
    metrics = module.trainer.callback_metrics
    last = losses[-1]
    assert float(metrics[f"adv/{method}_loss_epoch"]) == pytest.approx(sum(last) / len(last) / divisor, abs=atol)
    assert float(metrics[f"adv/{method}_loss"]) == pytest.approx(last[-1] / divisor, abs=atol)
    total = sum(len(e) for e in losses)
    assert float(metrics[f"adv/{method}_attacks"]) == total and float(metrics[f"adv/{method}_skipped"]) == 0


@pytest.mark.parametrize("method", ["pgd", "freelb"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_callback_float64_equals_reference(method, accumulate):
    module, reference, (cb,), losses = lightning_pair(method, accumulate=accumulate)
    assert max_diff(module.model, reference.model) < 1e-9
    assert cb.attacks == 8 and cb.skipped == 0
    _check_logged(module, method, losses)
    passes = 1 + (LPGD["steps"] if method == "pgd" else LFREELB["adv_steps"])
    assert module.steps_run == 8 * passes
    assert module.update_counts == [1, 2, 3, 4] * 2  # the metric counts the clean pass only


@pytest.mark.parametrize("over", [dict(norm_type="linf", adv_max_norm=0.05, adv_steps=1), dict(adv_max_norm=0.0)])
def test_freelb_callback_variants_equal_reference(over):
    module, reference, _, losses = lightning_pair("freelb", accumulate=2, over=over)
    assert max_diff(module.model, reference.model) < 1e-9
    _check_logged(module, "freelb", losses)


def _low_precision_pair(method, **kwargs):
    """PGD equals the reference. FreeLB weights the clean gradient by 1 / (1 + K) after Lightning's clean backward;
    the reference weights the loss before it. In a bf16/fp16 backward the two round differently (by the format's
    epsilon): the callback is exact against the reference that weights afterwards, and close to the source form."""
    module, reference, (cb,), losses = lightning_pair(method, dtype=torch.float32, **kwargs)
    assert cb.attacks == 8 and cb.skipped == 0
    if method == "pgd":
        assert max_diff(module.model, reference.model) < 1e-5
        return module, losses
    assert max_diff(module.model, reference.model) < 5e-3
    scaler = torch.amp.GradScaler("cpu") if kwargs.get("scaler") is not None else None
    after = TextModule(dtype=torch.float32)
    plain_fit(after, list(loader(make_data(16))), freelb_micro(**LFREELB, weight_clean_after=True), epochs=2,
              accumulate=kwargs.get("accumulate", 1), autocast_dtype=kwargs["ref_autocast"], scaler=scaler)
    assert max_diff(module.model, after.model) < 1e-5
    return module, losses


@pytest.mark.parametrize("method", ["pgd", "freelb"])
def test_callback_bf16_mixed_equals_autocast_reference(method):
    module, losses = _low_precision_pair(method, precision="bf16-mixed", ref_autocast=torch.bfloat16)
    _check_logged(module, method, losses, atol=1e-5 if method == "pgd" else 1e-2)


@pytest.mark.parametrize("method", ["pgd", "freelb"])
def test_callback_fp16_with_grad_scaler_equals_reference(method):
    module, losses = _low_precision_pair(method, accumulate=2, plugins=[MixedPrecision("16-mixed", "cpu")],
                                         ref_autocast=torch.float16, scaler=torch.amp.GradScaler("cpu"))
    _check_logged(module, method, losses, atol=1e-4 if method == "pgd" else 1e-3)


@pytest.mark.parametrize("method", ["pgd", "freelb"])
def test_mixin_equals_reference(method):
    module, reference, (cb,), losses = lightning_pair(method, accumulate=2, manual=True)
    assert max_diff(module.model, reference.model) < 1e-9
    assert cb.attacks == 8
    passes = 1 + (LPGD["steps"] if method == "pgd" else LFREELB["adv_steps"])
    assert module.loss_fn_calls == 8 * passes
    _check_logged(module, method, losses, divisor=2.0)  # ManualText's loss_fn returns loss / accumulate


def test_callback_device_side_pgd_equals_reference(monkeypatch):
    _force_device_side(monkeypatch)
    module, reference, (cb,), _ = lightning_pair("pgd", accumulate=2)
    assert max_diff(module.model, reference.model) < 1e-9 and cb.attacks == 8


@pytest.mark.parametrize("names", [("fgm", "awp"), ("awp", "fgm"), ("fgm", "pgd")])
def test_composed_callbacks_equal_reference(names):
    make = {"fgm": lambda: FGMCallback(**FGM_KW), "awp": lambda: AWPCallback(**AWP_KW), "pgd": lambda: PGDCallback(**PGD_KW)}
    cbs = [make[n]() for n in names]
    module, reference, _, _ = lightning_pair(None, accumulate=2, callbacks=cbs, micro=composed_micro(names))
    assert max_diff(module.model, reference.model) < 1e-9
    assert [cb.attacks for cb in cbs] == [8] * len(names)
    # not vacuous: the composed run differs from each method alone
    for n in names:
        alone = TextModule(dtype=torch.float64)
        plain_fit(alone, list(loader(make_data(16))), composed_micro((n,)), epochs=2, accumulate=2)
        assert max_diff(alone.model, module.model) > 1e-6
