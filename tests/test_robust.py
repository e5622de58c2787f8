"""RobustAccuracy: accuracy at FGM-perturbed embeddings, checked against a hand computation."""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F

from helpers import CLASSES, TextModule, loader, make_data, trainer
from lightning_adv.callbacks.robust import RobustAccuracy

EMB = "embeddings.word_embeddings.weight"


class RobustText(TextModule):
    """TextModule with the robust_forward protocol and a clean accuracy computed in validation_step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clean: List[Tuple[int, int]] = []

    def robust_forward(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, y = batch
        return self.model(ids), y

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, y = batch
        self.clean.append((int((self.model(ids).argmax(-1) == y).sum()), len(y)))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)


def hand_robust(model: nn.Module, batches: List[Tuple[torch.Tensor, torch.Tensor]], epsilon: float) -> Tuple[float, float]:
    """(clean accuracy, robust accuracy): per batch, W + epsilon * g / ||g|| with g = d loss / d W, by hand."""
    model.eval()
    weight = dict(model.named_parameters())[EMB]
    clean = robust = total = 0
    for ids, y in batches:
        logits = model(ids)
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y), [weight])
        moved = weight.detach() + epsilon * g / g.norm()
        with torch.no_grad():
            adv = torch.func.functional_call(model, {EMB: moved}, (ids,))
        clean += int((logits.argmax(-1) == y).sum())
        robust += int((adv.argmax(-1) == y).sum())
        total += len(y)
    return clean / total, robust / total


def batches_of(n: int = 24, batch_size: int = 4, seed: int = 3) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return list(loader(make_data(n, seed=seed), batch_size=batch_size))


@pytest.mark.parametrize("inference_mode", [True, False])
def test_robust_accuracy_equals_hand_computation(inference_mode: bool) -> None:
    data = make_data(24, seed=3)
    module = RobustText(seed=1)
    expected_clean, expected_robust = hand_robust(module.model, batches_of(), epsilon=10.0)
    assert 0 < expected_robust < expected_clean  # the attack bites, not completely: the test can tell them apart
    robust = RobustAccuracy(epsilon=10.0, num_classes=CLASSES)
    metrics = trainer(callbacks=[robust], inference_mode=inference_mode).validate(module, loader(data), verbose=False)[0]
    assert metrics["val_robust_acc"] == pytest.approx(expected_robust, abs=1e-6)
    assert sum(c for c, _ in module.clean) / sum(n for _, n in module.clean) == pytest.approx(expected_clean)
    assert robust.batches == 6 and robust.skipped == 0


def test_robust_logits_match_hand_logits() -> None:
    module = RobustText(seed=2)
    robust = RobustAccuracy(epsilon=2.5, num_classes=CLASSES)
    robust.setup(trainer(), module, "validate")
    module.eval()
    ids, y = batches_of()[0]
    weight = dict(module.model.named_parameters())[EMB]
    (g,) = torch.autograd.grad(F.cross_entropy(module.model(ids), y), [weight])
    with torch.no_grad():
        expected = torch.func.functional_call(module.model, {EMB: weight.detach() + 2.5 * g / g.norm()}, (ids,))
    logits, labels = robust.robust_logits(None, module, (ids, y))
    torch.testing.assert_close(logits, expected)
    assert torch.equal(labels, y)


def test_epsilon_zero_gives_clean_accuracy() -> None:
    module = RobustText(seed=4)
    metrics = trainer(callbacks=[RobustAccuracy(epsilon=0.0, num_classes=CLASSES)]).validate(module, loader(make_data(20, seed=5)), verbose=False)[0]
    clean = sum(c for c, _ in module.clean) / sum(n for _, n in module.clean)
    assert metrics["val_robust_acc"] == pytest.approx(clean)


def test_test_stage_logs_test_robust_acc() -> None:
    module = RobustText(seed=0)
    expected = hand_robust(module.model, batches_of(), epsilon=4.0)[1]
    metrics = trainer(callbacks=[RobustAccuracy(epsilon=4.0, num_classes=CLASSES)]).test(module, loader(make_data(24, seed=3)), verbose=False)[0]
    assert set(metrics) == {"test_robust_acc"}
    assert metrics["test_robust_acc"] == pytest.approx(expected)


class GradProbe(Callback):
    """Puts known gradients in ``.grad`` before each validation batch (Lightning zeroes them when validation
    starts) and, placed after RobustAccuracy, checks after each batch that they are the same objects, unchanged."""

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


def test_weights_and_grads_untouched_by_validation() -> None:
    module = RobustText(seed=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    robust, probe = RobustAccuracy(epsilon=10.0, num_classes=CLASSES), GradProbe()
    trainer(callbacks=[robust, probe]).validate(module, loader(make_data(16)), verbose=False)
    assert probe.checked == 4 and robust.batches == 4
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_fit_with_robust_accuracy_trains_exactly_as_without() -> None:
    """Validation in the middle of gradient accumulation: the training .grad and the weights are unaffected."""
    data = make_data(32, seed=7)

    def fit(callbacks: list) -> Tuple[RobustText, Any]:
        module = RobustText(seed=0)
        t = trainer(callbacks=callbacks, max_epochs=2, accumulate_grad_batches=2, val_check_interval=3, num_sanity_val_steps=2)
        t.fit(module, loader(data), loader(make_data(12, seed=8)))
        return module, t

    robust = RobustAccuracy(epsilon=3.0, num_classes=CLASSES)
    plain, _ = fit([])
    with_robust, t = fit([robust])
    for (n, a), (_, b) in zip(plain.named_parameters(), with_robust.named_parameters()):
        assert torch.equal(a, b), n
    assert plain.clean_losses == with_robust.clean_losses
    assert "val_robust_acc" in t.callback_metrics
    # 2 epochs x 2 validations x 3 batches; the sanity check is not measured
    assert robust.batches == 12


class NoProtocol(TextModule):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


def test_missing_protocol_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"NoProtocol.robust_forward\(batch\) -> \(logits, labels\)"):
        trainer(callbacks=[RobustAccuracy()]).validate(NoProtocol(), loader(make_data(8)), verbose=False)


def test_bad_emb_name_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"RobustAccuracy\(emb_name='nope'\).*word_embeddings"):
        trainer(callbacks=[RobustAccuracy(emb_name="nope")]).validate(RobustText(), loader(make_data(8)), verbose=False)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"epsilon": "1"}, "epsilon"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"emb_name": ""}, "emb_name"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"RobustAccuracy\({name}="):
        RobustAccuracy(**kwargs)


def test_stages_can_be_switched_off() -> None:
    robust = RobustAccuracy(epsilon=1.0, num_classes=CLASSES, validate=False)
    t = trainer(callbacks=[robust])
    assert t.validate(RobustText(), loader(make_data(8)), verbose=False)[0] == {}
    assert "test_robust_acc" in t.test(RobustText(), loader(make_data(8)), verbose=False)[0]
    assert robust.batches == 2
