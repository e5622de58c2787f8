"""RobustAccuracy and the core per-example embedding attack, checked against a plain per-example loop."""

from __future__ import annotations

import copy
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
from lightning_adv import FGMCallback, FreeLBCallback, in_adversarial_pass
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
    """A copy of the trained net (trained once): a fit on one copy does not change the next one."""
    if dtype not in _TRAINED:
        _TRAINED[dtype] = train_quickly(PadNet(seed=0, dtype=dtype), examples(128, seed=10))
    return copy.deepcopy(_TRAINED[dtype])


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
            delta = torch.zeros(1, ids.shape[1], DIM, dtype=net.hidden.weight.dtype)
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


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_deltas_stay_in_the_ball_and_off_the_padding(norm_type: str) -> None:
    net = trained()
    ids, y = collate(examples(6, seed=2))
    assert bool((ids == 0).any())
    attack = EmbeddingAttack(net, epsilon=0.7, norm_type=norm_type, steps=3, random_start=True)
    deltas: List[torch.Tensor] = []
    arm = attack.target.arm
    attack.target.arm = lambda make: arm(lambda out, mask: deltas.append(make(out, mask)) or deltas[-1])  # type: ignore[method-assign]
    attack.run(lambda: net(ids), y)
    assert len(deltas) == 1 + 3 + 1  # clean pass, 2 more gradient passes after the random start's, final pass
    for delta in deltas[1:]:
        assert delta.dtype == torch.float32
        assert bool((delta[ids == 0] == 0).all())
        per_example = delta.flatten(1).norm(dim=1) if norm_type == "l2" else delta.flatten(1).abs().amax(1)
        assert bool((per_example <= 0.7 + 1e-6).all()) and bool((per_example > 0).all())


def test_epsilon_zero_costs_nothing_and_gives_the_clean_logits() -> None:
    net = trained()
    ids, y = collate(examples(8, seed=3))
    calls = []
    handle = net.register_forward_hook(lambda *a: calls.append(1))
    try:
        result = EmbeddingAttack(net, epsilon=[0.0]).run(lambda: net(ids), y)
    finally:
        handle.remove()
    assert len(calls) == 1 and torch.equal(result.logits[0], result.clean_logits)
    values = result.per_example()
    assert torch.equal(values["robust_acc@0"], values["clean_acc"]) and bool((values["robust_loss_gain@0"] == 0).all())


@pytest.mark.parametrize("norm_type, epsilon", [("l2", 0.7), ("linf", 0.2)])
def test_pgd_is_at_least_as_strong_as_the_fast_gradient(norm_type: str, epsilon: float) -> None:
    net, data = trained(), batches(examples(128, seed=4), 64)
    fast = core(net, data, epsilon=epsilon, norm_type=norm_type, steps=1)
    pgd = core(net, data, epsilon=epsilon, norm_type=norm_type, steps=3)
    assert pgd["robust_acc"] <= fast["robust_acc"] < fast["clean_acc"]
    assert pgd[f"robust_loss_gain@{epsilon:g}"] >= fast[f"robust_loss_gain@{epsilon:g}"] > 0
    if norm_type == "l2":  # (linf on this mean-pooled model: PGD ends at epsilon * sign(g), the fast-gradient point)
        assert pgd[f"robust_loss_gain@{epsilon:g}"] > fast[f"robust_loss_gain@{epsilon:g}"]


def test_random_start_is_seeded() -> None:
    net, data = trained(), batches(examples(32, seed=5), 8)
    kwargs = dict(epsilon=1.0, steps=2, random_start=True)
    first, again = core(net, data, seed=3, **kwargs), core(net, data, seed=3, **kwargs)
    other = core(net, data, seed=4, **kwargs)
    assert first == again and first["robust_loss_gain@1"] != other["robust_loss_gain@1"]
    attack = EmbeddingAttack(net, seed=3, **kwargs)  # type: ignore[arg-type]
    ids, y = data[0]
    a = attack.run(lambda: net(ids), y).logits
    attack.reset()
    assert torch.equal(attack.run(lambda: net(ids), y).logits, a)


def test_no_host_synchronisation_and_no_parameter_grad(monkeypatch: Any) -> None:
    net = trained()
    ids, y = collate(examples(16, seed=6))
    attack = EmbeddingAttack(net, epsilon=[0.5, 1.0], norm_type="l2", steps=3, random_start=True)

    def sync(*args: Any) -> None:
        raise AssertionError("host synchronisation in the attack")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    result = attack.run(lambda: net(ids), y)
    monkeypatch.undo()
    assert result.logits.shape == (2, 16, 2)
    assert all(p.grad is None for p in net.parameters())


class Tied(PadNet):
    """The logits are scores against rows of the embedding matrix: the output layer shares its weight."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.pool(ids)[:, :DIM]
        return h @ self.get_input_embeddings().weight[1:3].T


class LoRAEmbedding(nn.Module):
    """A PEFT-style adapter: the base embedding frozen, a trainable low-rank update."""

    def __init__(self, base: nn.Embedding, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(base.num_embeddings, rank) * 0.1)
        self.b = nn.Parameter(torch.randn(rank, base.embedding_dim) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base(ids) + F.embedding(ids, self.a) @ self.b


@pytest.mark.parametrize("kind", ["frozen embedding", "frozen model", "tied", "peft"])
def test_frozen_tied_and_peft_embeddings(kind: str) -> None:
    net: PadNet = Tied(seed=1) if kind == "tied" else PadNet(seed=1)
    if kind == "frozen embedding":
        net.get_input_embeddings().requires_grad_(False)
    elif kind == "frozen model":
        net.requires_grad_(False)
    elif kind == "peft":
        net.embeddings.word_embeddings = LoRAEmbedding(net.embeddings.word_embeddings)  # type: ignore[assignment]
    net.eval()
    rows = examples(24, seed=7)
    got = core(net, batches(rows, 6), epsilon=1.0)
    acc, gain = reference(net, rows, 1.0)
    assert got["robust_acc"] == pytest.approx(acc) and got["robust_loss_gain@1"] == pytest.approx(gain, rel=1e-5)
    assert got["robust_loss_gain@1"] > 0
    assert all(p.grad is None for p in net.parameters())


def test_core_errors_are_clear() -> None:
    net = trained()
    ids, y = collate(examples(4))
    with pytest.raises(ValueError, match=r"pass epsilon="):
        EmbeddingAttack(net, epsilon=[0.5, 1.0]).perturbed_logits(lambda: net(ids), y)
    assert EmbeddingAttack(net, epsilon=[0.5, 1.0]).perturbed_logits(lambda: net(ids), y, epsilon=0.5).shape == (4, 2)
    with pytest.raises(RuntimeError, match=r"was not called by the forward"):
        EmbeddingAttack(net).run(lambda: net.head(torch.zeros(4, 16)), y)
    with pytest.raises(ValueError, match=r"robust_accuracy\(embedding='nope'\)"):
        core(net, [(ids, y)], embedding="nope")
    with pytest.raises(ValueError, match=r"no labels"):
        EmbeddingAttack(net).run(lambda: net(ids))
    with pytest.warns(UserWarning, match="training mode"):
        core(net.train(), [(ids, y)])
    net.eval()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": -1.0}, r"epsilon=-1.0\): epsilon must be a finite number >= 0"),
        ({"epsilon": float("nan")}, r"epsilon=nan\)"),
        ({"epsilon": "1"}, r"epsilon='1'\)"),
        ({"epsilon": [0.5, -2.0]}, r"epsilon=\[0.5, -2.0\]\): every epsilon must be a finite number >= 0, got -2.0"),
        ({"epsilon": []}, r"epsilon=\[\]\): .*non-empty list"),
        ({"epsilon": [1.0, 1]}, r"epsilon=\[1.0, 1\]\): the epsilons must be distinct"),
        ({"steps": 0}, r"steps=0\): steps must be an integer >= 1"),
        ({"steps": 2.0}, r"steps=2.0\)"),
        ({"norm_type": "l1"}, r"norm_type='l1'\): norm_type must be one of 'l2', 'linf'"),
        ({"step_size": -0.1}, r"step_size=-0.1\)"),
        ({"num_classes": 1}, r"num_classes=1\): num_classes must be an integer >= 2"),
        ({"num_classes": 2.0}, r"num_classes=2.0\)"),
        ({"seed": -1}, r"seed=-1\)"),
        ({"random_start": "yes"}, r"random_start='yes'\)"),
        ({"embedding": 3}, r"embedding=3\)"),
    ],
)
def test_bad_arguments_raise_value_error_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"RobustAccuracy\(" + message):
        RobustAccuracy(**kwargs)
    core_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes",)}
    if core_kwargs and "embedding" not in core_kwargs:
        with pytest.raises(ValueError, match=r"EmbeddingAttack\(" + message):
            EmbeddingAttack(trained(), **core_kwargs)


# -- the callback ----------------------------------------------------------------------------------------------
class RobustModule(L.LightningModule):
    """The robust_forward protocol; validation/test record the clean accuracy per dataloader."""

    def __init__(self, net: Optional[nn.Module] = None, lr: float = 0.03) -> None:
        super().__init__()
        self.model = net if net is not None else PadNet(seed=0)
        self.lr = lr
        self.clean: Dict[int, List[Tuple[int, int]]] = {}
        self.clean_losses: List[float] = []

    def robust_forward(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, y = batch
        return self.model(ids), y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        loss = F.cross_entropy(self.model(ids), y)
        if not in_adversarial_pass(self):
            self.clean_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        ids, y = batch
        self.clean.setdefault(dataloader_idx, []).append((int((self.model(ids).argmax(-1) == y).sum()), len(y)))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def clean_acc(self, dataloader_idx: int = 0) -> float:
        counts = self.clean[dataloader_idx]
        return sum(c for c, _ in counts) / sum(n for _, n in counts)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def eval_loader(rows: Sequence[Example], batch_size: int = 5) -> DataLoader:
    return DataLoader(list(rows), batch_size=batch_size, shuffle=False, collate_fn=collate)


class Poisoned(RobustModule):
    """The logits of the first example of every batch are infinite: its gradient is not finite."""

    def robust_forward(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, y = batch
        logits = self.model(ids)
        return logits * torch.where(torch.arange(len(y)) == 0, float("inf"), 1.0)[:, None], y


def test_nonfinite_gradients_are_counted_and_reported() -> None:
    module = Poisoned(trained())
    ids, y = collate(examples(6, seed=15))
    result = EmbeddingAttack(module.model, epsilon=[0.5, 1.0], steps=2).run(lambda: module.robust_forward((ids, y)))
    assert result.nonfinite.tolist() == [[True] + [False] * 5] * 2
    assert bool(torch.isfinite(result.logits[:, 1:]).all())  # the other examples are attacked as usual
    robust = RobustAccuracy(epsilon=1.0)
    with pytest.warns(UserWarning, match=r"gradient of 3 attacked example\(s\) was not finite"):
        trainer(callbacks=[robust]).validate(module, eval_loader(examples(12, seed=15)), verbose=False)
    assert robust.nonfinite == 3


@pytest.mark.parametrize("inference_mode", [True, False])
def test_callback_equals_the_core_and_the_reference(inference_mode: bool) -> None:
    net, rows = trained(), examples(40, seed=8)
    module = RobustModule(net)
    robust = RobustAccuracy(epsilon=1.0)
    metrics = trainer(callbacks=[robust], inference_mode=inference_mode).validate(module, eval_loader(rows), verbose=False)[0]
    assert set(metrics) == {"val_robust_acc@1", "val_robust_loss_gain@1"}  # one key per value (issue 21)
    expected = core(net, batches(rows, 40), epsilon=1.0)
    acc, gain = reference(net, rows, 1.0)
    assert metrics["val_robust_acc@1"] == pytest.approx(expected["robust_acc"]) == pytest.approx(acc)
    assert metrics["val_robust_loss_gain@1"] == pytest.approx(expected["robust_loss_gain@1"], abs=1e-5)
    assert metrics["val_robust_loss_gain@1"] == pytest.approx(gain, abs=1e-5)
    assert module.clean_acc() == pytest.approx(expected["clean_acc"]) and acc < expected["clean_acc"]
    assert robust.batches == 8


def test_several_epsilons_one_key_each_and_test_stage() -> None:
    net, rows = trained(), examples(30, seed=9)
    module = RobustModule(net)
    robust = RobustAccuracy(epsilon=[0.0, 0.5, 2.0], norm_type="linf", steps=2)
    metrics = trainer(callbacks=[robust]).test(module, eval_loader(rows), verbose=False)[0]
    keys = {f"test_robust_{m}@{e}" for m in ("acc", "loss_gain") for e in ("0", "0.5", "2")}
    assert set(metrics) == keys
    expected = core(net, batches(rows, 7), epsilon=[0.0, 0.5, 2.0], norm_type="linf", steps=2)
    for key in keys:
        assert metrics[key] == pytest.approx(expected[key[len("test_"):]], abs=1e-5), key
    assert metrics["test_robust_acc@0"] == pytest.approx(module.clean_acc()) and metrics["test_robust_loss_gain@0"] == 0
    assert metrics["test_robust_acc@2"] < metrics["test_robust_acc@0.5"] < metrics["test_robust_acc@0"]


@pytest.mark.parametrize("prog_bar, shown", [(True, ["val_rob@0.5"]), (2.0, ["val_rob@2"]), (1, ["val_rob@1"]), (False, [])])
def test_progress_bar_shows_one_short_name(prog_bar: Any, shown: List[str]) -> None:
    """Three epsilons: one robust accuracy on the bar, under a short name; the loggers keep every full key (issue 21)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    seen: Dict[str, Any] = {}

    class Look(Callback):
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen.update(trainer.progress_bar_callback.get_metrics(trainer, pl_module))

    robust = RobustAccuracy(epsilon=[0.5, 1.0, 2.0], prog_bar=prog_bar)
    t = trainer(callbacks=[robust, TQDMProgressBar(), Look()], enable_progress_bar=True)
    metrics = t.validate(RobustModule(trained()), eval_loader(examples(10, seed=2)), verbose=False)[0]
    assert len(metrics) == 6  # acc and loss gain at each epsilon, one key each
    assert sorted(k for k in seen if "rob" in k) == shown
    if shown:
        full = "val_robust_acc@" + shown[0].split("@")[1]
        assert list(t.progress_bar_metrics) == [full] and seen[shown[0]] == pytest.approx(metrics[full])
    else:
        assert t.progress_bar_metrics == {}
    assert "get_metrics" not in vars(t.progress_bar_callback)


def test_prog_bar_must_name_one_of_the_epsilons() -> None:
    with pytest.raises(ValueError, match=r"RobustAccuracy\(prog_bar=0.25\): prog_bar must be True, False or one of the epsilons \[0.5, 1.0\]"):
        RobustAccuracy(epsilon=[0.5, 1.0], prog_bar=0.25)


def test_epsilon_zero_gives_the_clean_accuracy() -> None:
    module = RobustModule(PadNet(seed=4))
    metrics = trainer(callbacks=[RobustAccuracy(epsilon=0.0)]).validate(module, eval_loader(examples(20, seed=5)), verbose=False)[0]
    assert metrics["val_robust_acc@0"] == pytest.approx(module.clean_acc()) and metrics["val_robust_loss_gain@0"] == 0


def test_two_dataloaders_give_two_separate_values() -> None:
    net = trained()
    easy, hard = examples(20, seed=11), examples(25, seed=12)
    module = RobustModule(net)
    robust = RobustAccuracy(epsilon=[0.5, 1.5])
    metrics = trainer(callbacks=[robust]).validate(module, [eval_loader(easy), eval_loader(hard, 4)], verbose=False)
    for i, rows in enumerate((easy, hard)):
        expected = core(net, [collate(rows)], epsilon=[0.5, 1.5])
        assert set(metrics[i]) == {f"val_robust_{m}@{e}/dataloader_idx_{i}" for m in ("acc", "loss_gain") for e in ("0.5", "1.5")}
        for key in ("robust_acc@0.5", "robust_acc@1.5", "robust_loss_gain@1.5"):
            assert metrics[i][f"val_{key}/dataloader_idx_{i}"] == pytest.approx(expected[key], abs=1e-5), (i, key)
    assert metrics[0]["val_robust_loss_gain@1.5/dataloader_idx_0"] != metrics[1]["val_robust_loss_gain@1.5/dataloader_idx_1"]


def test_bf16_mixed_precision() -> None:
    net, rows = trained(), examples(30, seed=13)
    expected = core(net, batches(rows, 30), epsilon=0.5)
    robust = RobustAccuracy(epsilon=0.5)
    metrics = trainer(callbacks=[robust], precision="bf16-mixed").validate(RobustModule(net), eval_loader(rows), verbose=False)[0]
    assert metrics["val_robust_acc@0.5"] == pytest.approx(expected["robust_acc"], abs=0.1)
    assert metrics["val_robust_loss_gain@0.5"] == pytest.approx(expected["robust_loss_gain@0.5"], abs=0.1)


def test_callback_random_start_is_reproducible() -> None:
    net, rows = trained(), examples(20, seed=14)
    robust = RobustAccuracy(epsilon=1.0, steps=2, random_start=True, seed=5)
    t = trainer(callbacks=[robust])
    first = t.validate(RobustModule(net), eval_loader(rows), verbose=False)[0]
    again = t.validate(RobustModule(net), eval_loader(rows), verbose=False)[0]  # re-seeded at every epoch start
    assert first == again
    assert first["val_robust_loss_gain@1"] == pytest.approx(core(net, batches(rows, 5), epsilon=1.0, steps=2, random_start=True, seed=5)["robust_loss_gain@1"], abs=1e-5)


class GradProbe(Callback):
    """Puts known gradients in ``.grad`` before each validation batch and, placed after RobustAccuracy, checks
    after each batch that they are the same objects, unchanged."""

    def __init__(self) -> None:
        self.checked = 0

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.grads = {n: torch.full_like(p, 0.5) for n, p in pl_module.named_parameters()}
        for n, p in pl_module.named_parameters():
            p.grad = self.grads[n]

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        for n, p in pl_module.named_parameters():
            assert p.grad is self.grads[n] and bool((p.grad == 0.5).all()), n
        self.checked += 1


def test_weights_grads_and_mode_untouched_by_validation() -> None:
    module = RobustModule(PadNet(seed=2))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    robust, probe = RobustAccuracy(epsilon=2.0, steps=2, random_start=True), GradProbe()
    trainer(callbacks=[robust, probe]).validate(module, eval_loader(examples(16)), verbose=False)
    assert probe.checked == 4 and robust.batches == 4
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n


def tokens(n: int, seed: int) -> TensorDataset:
    """Sentences of 6 real tokens, the label as :func:`label_of` says."""
    ids = torch.randint(1, VOCAB, (n, 6), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(ids, label_of(ids))


def test_fit_with_robust_accuracy_trains_exactly_as_without() -> None:
    """Validation in the middle of gradient accumulation: the training .grad and the weights are unaffected."""

    def fit(callbacks: list) -> Tuple[RobustModule, Any]:
        module = RobustModule(PadNet(seed=0))
        t = trainer(callbacks=callbacks, max_epochs=2, accumulate_grad_batches=2, val_check_interval=3, num_sanity_val_steps=2)
        t.fit(module, DataLoader(tokens(32, 7), batch_size=4), eval_loader(examples(12, seed=8), 4))
        return module, t

    robust = RobustAccuracy(epsilon=[1.0, 3.0])
    plain, _ = fit([])
    with_robust, t = fit([robust])
    for (n, a), (_, b) in zip(plain.named_parameters(), with_robust.named_parameters()):
        assert torch.equal(a, b), n
    assert plain.clean_losses == with_robust.clean_losses
    assert "val_robust_acc@3" in t.callback_metrics
    assert robust.batches == 2 * 2 * 3  # 2 epochs x 2 validations x 3 batches; the sanity check is not measured


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_adversarial_training_is_measurably_more_robust() -> None:
    """A toy task, fixed seed: FGM and FreeLB training give a higher robust accuracy at epsilon 1 than plain training."""
    train, test = DataLoader(tokens(256, 0), batch_size=32), DataLoader(tokens(256, 1), batch_size=64)

    def robust_acc(callbacks: list) -> float:
        module = RobustModule(PadNet(seed=0))
        trainer(callbacks=callbacks, max_epochs=10).fit(module, train)
        return trainer(callbacks=[RobustAccuracy(epsilon=1.0)]).test(module, test, verbose=False)[0]["test_robust_acc@1"]

    plain = robust_acc([])
    fgm = robust_acc([FGMCallback(epsilon=1.0)])
    freelb = robust_acc([FreeLBCallback(adv_lr=0.5, adv_steps=2, adv_init_mag=0.0)])
    print(f"robust accuracy at epsilon 1: plain {plain:.3f}, FGM {fgm:.3f}, FreeLB {freelb:.3f}")
    assert fgm >= plain + 0.05 and freelb >= plain + 0.1, (plain, fgm, freelb)


# -- the callback's protocol and arguments -----------------------------------------------------------------------
class NoProtocol(RobustModule):
    robust_forward = None  # type: ignore[assignment]


def test_missing_protocol_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"NoProtocol.robust_forward\(batch\) -> \(logits, labels\)"):
        trainer(callbacks=[RobustAccuracy()]).validate(NoProtocol(), eval_loader(examples(8)), verbose=False)


def test_bad_embedding_path_and_num_classes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"RobustAccuracy\(embedding='nope'\): .* has no submodule 'nope'"):
        trainer(callbacks=[RobustAccuracy(embedding="nope")]).validate(RobustModule(), eval_loader(examples(8)), verbose=False)
    with pytest.raises(ValueError, match=r"RobustAccuracy\(num_classes=3\): robust_forward returned logits of shape \(5, 2\)"):
        trainer(callbacks=[RobustAccuracy(num_classes=3)]).validate(RobustModule(), eval_loader(examples(8)), verbose=False)


def test_embedding_path_names_the_module() -> None:
    robust = RobustAccuracy(epsilon=1.0, embedding="model.embeddings.word_embeddings")
    rows = examples(10, seed=3)
    metrics = trainer(callbacks=[robust]).validate(RobustModule(trained()), eval_loader(rows), verbose=False)[0]
    assert metrics["val_robust_acc@1"] == pytest.approx(core(trained(), [collate(rows)], epsilon=1.0)["robust_acc"])
    assert robust.attack is not None and robust.attack.target.path == "model.embeddings.word_embeddings"
    assert robust.describe() == "FGM epsilon=1"
    assert RobustAccuracy(epsilon=[0.5, 1.0], norm_type="linf", steps=3).describe() == "PGD-3 linf epsilon=0.5,1"


def test_stages_can_be_switched_off() -> None:
    robust = RobustAccuracy(epsilon=1.0, validate=False)
    t = trainer(callbacks=[robust])
    assert t.validate(RobustModule(), eval_loader(examples(8)), verbose=False)[0] == {}
    assert "test_robust_acc@1" in t.test(RobustModule(), eval_loader(examples(8)), verbose=False)[0]
    assert robust.batches == 2


def test_ddp_ranks_report_the_mean_over_all_examples(tmp_path: Any) -> None:
    """2 gloo ranks, each validating its DistributedSampler half: torchmetrics syncs the sums, so every rank logs
    the accuracy over all 40 examples, equal to one process."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "robust_ddp_script.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = core(trained(), batches(examples(40, seed=8), 40), epsilon=[0.5, 1.0])
    for rank in ranks:
        assert rank["batches"] == 4  # 20 examples per rank, batches of 5
        for eps in ("0.5", "1"):
            assert rank[f"val_robust_acc@{eps}"] == pytest.approx(expected[f"robust_acc@{eps}"], abs=1e-6)
            assert rank[f"val_robust_loss_gain@{eps}"] == pytest.approx(expected[f"robust_loss_gain@{eps}"], abs=1e-4)
