"""RobustAccuracy and the core per-example embedding attack, checked against a plain per-example loop."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import trainer
from lightning_adv import FGMCallback, FreeLBCallback
from lightning_adv.callbacks.robust import RobustAccuracy
from lightning_adv.core import EmbeddingAttack, robust_accuracy

VOCAB, DIM, MAXLEN = 30, 8, 7
Example = Tuple[torch.Tensor, torch.Tensor]


# -- a text model with padding, and data of several lengths ---------------------------------------------------
class PadNet(nn.Module):
    """Embedding (padding id 0) + mean over the real tokens + MLP; ``get_input_embeddings`` like transformers."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.hidden = nn.Linear(DIM, 16)
        self.head = nn.Linear(16, classes)
        self.to(dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def pool(self, ids: torch.Tensor) -> torch.Tensor:
        real = (ids != 0).unsqueeze(-1).to(self.hidden.weight.dtype)
        e = self.get_input_embeddings()(ids)
        return torch.tanh(self.hidden((e * real).sum(1) / real.sum(1).clamp_min(1)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(ids))


def label_of(ids: torch.Tensor) -> torch.Tensor:
    """Class 1 when most tokens are from the lower half of the vocabulary."""
    real = ids != 0
    return ((torch.where(ids < VOCAB // 2, 1, -1) * real).sum(-1) > 0).long()


def examples(n: int = 64, seed: int = 0) -> List[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, MAXLEN + 1, (), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        out.append((ids, label_of(ids)))
    return out


def collate(rows: Sequence[Example]) -> Example:
    """Pads to the longest example of the batch."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (x, _) in enumerate(rows):
        ids[i, : len(x)] = x
    return ids, torch.stack([y for _, y in rows])


def batches(rows: Sequence[Example], batch_size: int) -> List[Example]:
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def train_quickly(net: PadNet, rows: Sequence[Example], steps: int = 150) -> PadNet:
    """Full-batch Adam: a model that classifies most examples correctly, so that attacks have something to break."""
    ids, y = collate(rows)
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(ids), y).backward()
        opt.step()
    for p in net.parameters():
        p.grad = None
    return net.eval()


_TRAINED: Dict[torch.dtype, PadNet] = {}


def trained(dtype: torch.dtype = torch.float32) -> PadNet:
    if dtype not in _TRAINED:
        _TRAINED[dtype] = train_quickly(PadNet(seed=0, dtype=dtype), examples(128, seed=10))
    return _TRAINED[dtype]


def core(net: nn.Module, data: Sequence[Example], **kwargs: Any) -> Dict[str, float]:
    return robust_accuracy(net, lambda b: (net(b[0]), b[1]), data, **kwargs)


# -- the reference: each example alone, unpadded, as the textbook writes the attacks -----------------------------
def reference(net: nn.Module, rows: Sequence[Example], epsilon: float, norm_type: str = "l2", steps: int = 1) -> Tuple[float, float]:
    """(robust accuracy, mean loss gain) with a plain loop over the examples, each in a batch of its own."""
    emb = net.get_input_embeddings()
    current: List[Optional[torch.Tensor]] = [None]
    handle = emb.register_forward_hook(lambda m, a, out: out + current[0] if current[0] is not None else None)
    correct, gains = 0, []
    alpha = epsilon if steps == 1 else 2.5 * epsilon / steps
    try:
        for ids, y in rows:
            ids, y = ids[None], y.view(1)
            with torch.no_grad():
                clean = F.cross_entropy(net(ids), y)
            delta = torch.zeros(1, ids.shape[1], DIM, dtype=emb.weight.dtype)
            for _ in range(steps):
                d = delta.clone().requires_grad_()
                current[0] = d
                (g,) = torch.autograd.grad(F.cross_entropy(net(ids), y), [d])
                if norm_type == "l2":
                    norm = float(g.norm())
                    delta = delta + alpha * (g / norm if norm > 0 else g)
                    if float(delta.norm()) > epsilon:
                        delta = delta * epsilon / delta.norm()
                else:
                    delta = (delta + alpha * g.sign()).clamp(-epsilon, epsilon)
            current[0] = delta
            with torch.no_grad():
                adv = net(ids)
            current[0] = None
            correct += int(adv.argmax(-1) == y)
            gains.append(float(F.cross_entropy(adv, y) - clean))
    finally:
        handle.remove()
    return correct / len(rows), sum(gains) / len(gains)


# -- the core --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type, steps, epsilon", [("l2", 1, 1.0), ("linf", 1, 0.3), ("l2", 3, 1.0), ("linf", 3, 0.3)])
def test_core_equals_per_example_reference_at_any_batch_size_and_order(norm_type: str, steps: int, epsilon: float) -> None:
    net = trained(torch.float64)
    rows = examples(64, seed=1)
    ref_acc, ref_gain = reference(net, rows, epsilon, norm_type, steps)
    clean = core(net, [collate(rows)], epsilon=0.0)["clean_acc"]
    assert 0.2 < ref_acc < clean - 0.1  # the attack bites, not completely: the comparisons can tell things apart
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    for data in (batches(rows, 1), batches(rows, 5), batches(rows, 64), batches(shuffled, 5)):
        got = core(net, data, epsilon=epsilon, norm_type=norm_type, steps=steps)
        assert got["robust_acc"] == got[f"robust_acc@{epsilon:g}"] == pytest.approx(ref_acc, abs=1e-12)
        assert got[f"robust_loss_gain@{epsilon:g}"] == pytest.approx(ref_gain, rel=1e-9)
        assert got["clean_acc"] == pytest.approx(clean, abs=1e-12)


def test_core_float32_does_not_depend_on_batch_size() -> None:
    net, rows = trained(), examples(64, seed=1)
    results = [core(net, batches(rows, bs), epsilon=[0.5, 1.0]) for bs in (1, 5, 64)]
    for got in results[1:]:
        assert got.keys() == results[0].keys()
        for key in got:
            assert got[key] == pytest.approx(results[0][key], abs=1e-5), key


def test_padding_gets_no_perturbation() -> None:
    net = trained()
    ids, y = collate(examples(6, seed=2))
    seen: List[torch.Tensor] = []
    handle = net.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    attack = EmbeddingAttack(net, epsilon=1.0, steps=2, random_start=True)
    try:
        attack.run(lambda: net(ids), y)
    finally:
        handle.remove()
    deltas = [out - seen[0] for out in seen[1:]]  # our hook runs first: what the later hook sees is output + delta
    assert len(deltas) == 0  # the hook registered after ours sees the output it returned? no: hooks see the original
