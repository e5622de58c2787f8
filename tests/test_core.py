"""The pure-PyTorch core: the device-side arithmetic (what runs on a GPU, forced here on the CPU) equals the
host-side one the CPU tests exercise, and both equal the reference snippets, also for non-finite gradients and
the row-wise saving of embedding matrices."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import TinyText
from lightning_adv import AWP, FGM
from reference_snippets import RefAWP, RefFGM


# -- the device-side branch (GPU) equals the host-side branch (CPU) ----------------------------------------------------


def _force_device_side(monkeypatch):
    import lightning_adv.core.snapshot as attack_module

    monkeypatch.setattr(attack_module, "on_host", lambda tensors: False)


def _attack_once(make_attack, model, ids, y, grads=None):
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(ids), y)  # noqa: E731
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    if grads is not None:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
    attack = make_attack(model)
    before = [p.detach().clone() for p in model.parameters()]
    attack.attack_backward(loss_fn)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # restored exactly
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()], attack


ATTACKS = {
    "fgm": lambda m: FGM(m, epsilon=0.7, emb_name="word_embeddings"),
    "awp1": lambda m: AWP(m, adv_lr=0.5, adv_eps=0.05, adv_step=1),
    "awp3": lambda m: AWP(m, adv_lr=0.5, adv_eps=0.05, adv_step=3),
    "awp_eps0": lambda m: AWP(m, adv_lr=0.5, adv_eps=0.0, adv_step=2),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_device_side_equals_host_side(name, monkeypatch):
    torch.manual_seed(0)
    model = TinyText().double()
    ids, y = torch.randint(0, 40, (6, 5)), torch.randint(0, 3, (6,))
    host, _ = _attack_once(ATTACKS[name], copy.deepcopy(model), ids, y)
    _force_device_side(monkeypatch)
    device, _ = _attack_once(ATTACKS[name], copy.deepcopy(model), ids, y)
    for a, b in zip(host, device):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_host_side_awp_equals_reference(steps):
    torch.manual_seed(1)
    model = TinyText().double()
    ids, y = torch.randint(0, 40, (6, 5)), torch.randint(0, 3, (6,))
    ours, _ = _attack_once(lambda m: AWP(m, adv_lr=0.5, adv_eps=0.05, adv_step=steps), copy.deepcopy(model), ids, y)
    ref_model = copy.deepcopy(model)
    loss_fn = lambda: torch.nn.functional.cross_entropy(ref_model(ids), y)  # noqa: E731
    loss_fn().backward()
    RefAWP(ref_model, adv_param="weight", adv_lr=0.5, adv_eps=0.05, adv_step=steps).attack_backward(loss_fn, lambda l: l.backward())
    for a, p in zip(ours, ref_model.parameters()):
        assert torch.allclose(a, p.grad, rtol=0, atol=1e-12)


def test_host_side_fgm_equals_reference():
    torch.manual_seed(2)
    model = TinyText().double()
    ids, y = torch.randint(0, 40, (6, 5)), torch.randint(0, 3, (6,))
    ours, _ = _attack_once(ATTACKS["fgm"], copy.deepcopy(model), ids, y)
    ref_model = copy.deepcopy(model)
    loss_fn = lambda: torch.nn.functional.cross_entropy(ref_model(ids), y)  # noqa: E731
    loss_fn().backward()
    ref = RefFGM(ref_model, epsilon=0.7, emb_name="word_embeddings")
    ref.attack()
    loss_fn().backward()
    ref.restore()
    for a, p in zip(ours, ref_model.parameters()):
        assert torch.allclose(a, p.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["fgm", "awp1", "awp3"])
def test_non_finite_gradient_skips_on_both_sides(name, monkeypatch):
    """An inf and a nan in the clean gradient: the (first) pass perturbs nothing, on either side."""
    torch.manual_seed(3)
    model = TinyText().double()
    ids, y = torch.randint(0, 40, (6, 5)), torch.randint(0, 3, (6,))
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(ids), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    grads[0][0, 0] = float("inf")  # the word embedding
    grads[1][0, 0] = float("nan")  # a hidden weight
    clean = torch.nn.functional.cross_entropy(model(ids), y).detach()
    results = []
    for device_side in (False, True):
        if device_side:
            _force_device_side(monkeypatch)
        out, attack = _attack_once(ATTACKS[name], copy.deepcopy(model), ids, y, grads)
        assert bool(attack.last_skipped)
        if getattr(attack, "adv_step", 1) == 1:  # the adversarial pass ran at the unperturbed weights
            assert torch.allclose(attack.last_loss, clean, rtol=0, atol=1e-12)
        results.append((out, attack.last_loss))
    (host, host_loss), (device, device_loss) = results
    assert torch.allclose(host_loss, device_loss, rtol=0, atol=1e-12)
    for a, b in zip(host, device):
        assert torch.allclose(a, b, rtol=0, atol=1e-12, equal_nan=True)


# -- the row-wise branch: an embedding matrix of which a batch touches few rows ------------------------------------


class WideText(torch.nn.Module):
    """Like TinyText, with a vocabulary of 300: a batch of 30 tokens touches at most a tenth of its rows."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = torch.nn.Module()
        self.embeddings.word_embeddings = torch.nn.Embedding(300, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embeddings.word_embeddings(ids).mean(dim=1))))


def _run(kind, model, batches, *, reference=False):
    """Clean backward on batches[0], then the attack whose k-th adversarial pass uses batches[k % len]."""
    calls = iter(range(100))

    def loss_fn():
        ids, y = batches[next(calls) % len(batches)]
        return torch.nn.functional.cross_entropy(model(ids), y)

    loss_fn().backward()
    seen = []
    if reference:
        if kind == "fgm":
            ref = RefFGM(model, epsilon=0.7, emb_name="word_embeddings")
            ref.attack()
            loss_fn().backward()
            ref.restore()
        else:
            RefAWP(model, adv_param="weight", adv_lr=0.5, adv_eps=0.05, adv_step=int(kind[3:])).attack_backward(
                loss_fn, lambda loss: loss.backward())
    else:
        attack = ATTACKS[kind](model)

        def probed():
            seen.append(attack.saved_bytes())
            return loss_fn()

        attack.attack_backward(probed)
    return [p.grad.clone() for p in model.parameters()], seen


@pytest.mark.parametrize("kind", ["fgm", "awp1", "awp3"])
def test_row_wise_branch_equals_dense_and_reference(kind, monkeypatch):
    torch.manual_seed(4)
    model = WideText().double()
    g = torch.Generator().manual_seed(5)
    # the adversarial passes of awp3 see other tokens: rows are added to the saved ones between passes
    batches = [(torch.randint(0, 300, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    host, seen = _run(kind, copy.deepcopy(model), batches)
    reference, _ = _run(kind, copy.deepcopy(model), batches, reference=True)
    _force_device_side(monkeypatch)
    device, seen_device = _run(kind, copy.deepcopy(model), batches)
    for a, b, r in zip(host, device, reference):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
        assert torch.allclose(a, r, rtol=0, atol=1e-12)
    # the host side saved only rows of the embedding matrix (values and indices), the device side all of it
    emb = model.embeddings.word_embeddings.weight
    emb_bytes = emb.numel() * emb.element_size()
    assert seen_device[0] - seen[0] > emb_bytes * 0.8
    if kind == "awp3":
        assert seen[0] < seen[1] <= seen[2]  # grown by the rows of the other batches


def test_touched_rows_finds_exactly_the_rows_that_are_not_zero():
    from lightning_adv.core.snapshot import touched_rows

    g = torch.zeros(10, 4, dtype=torch.float64)
    g[2, 3] = 1e-300  # tiny, not zero; its first column zero
    g[7, 0] = -2.0
    g[5, 1] = float("nan")
    assert touched_rows(g).tolist() == [2, 5, 7]
    g[8] = -0.0  # a negative zero is zero
    assert touched_rows(g).tolist() == [2, 5, 7]
    dense = torch.randn(10, 4)
    assert touched_rows(dense) is None  # most rows touched: seen from the first column
    dense[:, 0] = 0.0
    assert touched_rows(dense) is None  # the first column zero, the rows still touched: the full check
    assert touched_rows(torch.zeros(10, 4)).tolist() == []
    assert touched_rows(torch.randn(10)) is None  # a vector is dense


def test_zero_nonfinite_skips_the_pass_only_when_all_are_finite():
    from lightning_adv.core.snapshot import zero_nonfinite

    t = [torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")])]
    zero_nonfinite(t, torch.tensor(False))
    assert t[0].tolist() == [1.0, 0.0] and t[1].tolist() == [0.0]
    t = [torch.tensor([1.0, 2.0])]
    zero_nonfinite(t, torch.tensor(True))
    assert t[0].tolist() == [1.0, 2.0]
