"""The method contract (issue 18): methods that land without an edit to the engine, each exact to its source in
float64, and the README's "How to add a method" example."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_adv.core import adversarial_backward
from lightning_adv.core.contract import COMBINE_RULES, Contract
from lightning_adv.core.neftune import NEFTune
from lightning_adv.core.sam import SAM


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]


class RefSAM:
    """davda54/sam ``sam.py`` written out from its source: first_step adds e_w = rho * g / (||g|| + 1e-12) (ASAM:
    w^2 * g with the norm of |w| * g) to every parameter holding a gradient, second_step subtracts it and lets the
    base optimizer step."""

    def __init__(self, params, base, rho: float, adaptive: bool) -> None:
        self.params, self.base, self.rho, self.adaptive = list(params), base, rho, adaptive
        self.e_w = {}

    @torch.no_grad()
    def first_step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([((p.abs() if self.adaptive else 1.0) * p.grad).norm(p=2) for p in with_grad]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in with_grad:
            e_w = (p.pow(2) if self.adaptive else 1.0) * p.grad * scale
            p.add_(e_w)
            self.e_w[p] = e_w
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def second_step(self) -> None:
        for p in self.params:
            if p in self.e_w:
                p.sub_(self.e_w[p])
        self.base.step()
        self.base.zero_grad()


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_equals_davda54_loop_float64(adaptive):
    ours, ref = _net(), _net()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    sam = SAM(ours, rho=0.05 if not adaptive else 0.5, adaptive=adaptive)
    ref_opt = RefSAM(ref.parameters(), torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), sam.rho, adaptive)
    for _ in range(3):  # epochs
        for x, y in _data():
            adversarial_backward(ours, [sam], lambda: F.cross_entropy(ours(x), y))
            opt.step()
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            ref_opt.first_step()
            F.cross_entropy(ref(x), y).backward()
            ref_opt.second_step()
    diff = max(float((p - q).abs().max()) for p, q in zip(ours.parameters(), ref.parameters()))
    assert diff < 1e-9
    plain = _net()  # and SAM matters
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for x, y in _data():
            F.cross_entropy(plain(x), y).backward()
            plain_opt.step()
            plain_opt.zero_grad()
    assert max(float((p - q).abs().max()) for p, q in zip(ours.parameters(), plain.parameters())) > 1e-4


def test_sam_restores_weights_exactly_and_rho_zero_is_plain():
    net = _net()
    before = copy.deepcopy(net)
    x, y = _data()[0]
    adversarial_backward(net, [SAM(net, rho=1.0)], lambda: F.cross_entropy(net(x), y))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before.parameters()))
    assert not SAM(net, rho=0.0).enabled()
    with pytest.raises(ValueError, match=r"SAM\(rho=-1\): rho must be a finite number >= 0"):
        SAM(net, rho=-1)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def test_neftune_padded_equals_transformers_hook_float64():
    """transformers' ``neftune_post_forward_hook`` (integrations/neftune.py), with the same global random state."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    ours, ref = Tokens(), Tokens()
    ids, y = torch.randint(1, 30, (4, 6)), torch.tensor([0, 1, 2, 0])
    ids[0, -2:] = 0
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the hook computes its magnitude in the default dtype
    try:
        torch.manual_seed(5)
        adversarial_backward(ours, [NEFTune(ours, noise_alpha=5.0, embedding="emb")], lambda: F.cross_entropy(ours(ids), y))
        ref.emb.neftune_noise_alpha = 5.0
        handle = ref.emb.register_forward_hook(neftune_post_forward_hook)
        torch.manual_seed(5)
        F.cross_entropy(ref(ids), y).backward()
        handle.remove()
    finally:
        torch.set_default_dtype(previous)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12)
    plain = Tokens()
    F.cross_entropy(plain(ids), y).backward()
    assert float((plain.head.weight.grad - ours.head.weight.grad).abs().max()) > 1e-4  # the noise is there


def test_neftune_tokens_length_masks_padding_and_leaves_no_hook():
    net = Tokens()
    ids = torch.randint(1, 30, (2, 6))
    ids[0, -3:] = 0
    method = NEFTune(net, noise_alpha=5.0, length="tokens", embedding="emb")
    noise = method.noise(torch.zeros(2, 6, 8, dtype=torch.float64), ids != 0)
    assert float(noise[0, -3:].abs().max()) == 0.0
    assert float(noise[0, :3].abs().max()) <= 5.0 / (3 * 8) ** 0.5 and float(noise[0, :3].abs().max()) > 0
    assert float(noise[1].abs().max()) <= 5.0 / (6 * 8) ** 0.5
    adversarial_backward(net, [method], lambda: net(ids).sum())
    assert not net.emb._forward_hooks
    net.eval()
    assert float(method.noise(torch.zeros(2, 6, 8), ids != 0).abs().max()) == 0.0  # training only, as the source


def test_every_method_declares_a_combine_rule():
    import lightning_adv.core as core

    classes = [core.FGM, core.PGD, core.AWP, core.FreeLB, core.R3F, core.SMART, SAM, NEFTune, core.RDrop, core.VAT]
    assert all(issubclass(c, Contract) and c.combine in COMBINE_RULES for c in classes)
    assert {c.__name__: c.combine for c in classes} == {
        "FGM": "add", "PGD": "add", "AWP": "replace", "FreeLB": "add", "R3F": "extend_loss", "SMART": "extend_loss",
        "SAM": "replace", "NEFTune": "extend_loss", "RDrop": "extend_loss", "VAT": "extend_loss",
    }


def test_engine_names_no_method():
    """The engine and the ledger import no method and read no method flag by getattr: they apply declarations."""
    import inspect

    import lightning_adv.core.ledger as ledger
    import lightning_adv.core.step as step

    for module in (step, ledger):
        for name in ("FGM", "PGD", "AWP", "FreeLB", "R3F", "SMART", "SAM", "NEFTune", "RDrop", "VAT", "Method",
                     "ParameterMethod"):
            assert not hasattr(module, name), (module.__name__, name)
        assert "getattr(" not in inspect.getsource(module)
