"""The README's self-contained Python snippets run as written."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _snippet(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


@pytest.mark.parametrize("marker", ["class Classifier(L.LightningModule)", "outcomes = adversarial_backward(model, methods",
                                    "results, summary = deepwordbug_attack("])
def test_readme_snippet_runs(marker):
    code = _snippet(marker).replace("logger=False)", "logger=False, enable_progress_bar=False, enable_model_summary=False)")
    namespace: dict = {}
    exec(compile(code, f"README:{marker}", "exec"), namespace)


def test_readme_example_attacks_with_every_method(capsys):
    code = _snippet("class Classifier(L.LightningModule)")
    code = code.replace("logger=False)", "logger=False, enable_progress_bar=False, enable_model_summary=False)")
    exec(compile(code, "README:every method", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith(("Callback 4", "Callback 2"))]
    assert printed == [["FGMCallback", "4"], ["PGDCallback", "4"], ["AWPCallback", "2"], ["FreeLBCallback", "4"],
                       ["R3FCallback", "4"], ["SMARTCallback", "4"]]


def test_readme_deepwordbug_snippet_prints(capsys):
    exec(compile(_snippet("results, summary = deepwordbug_attack("), "README:deepwordbug", "exec"), {})
    words = capsys.readouterr().out.split()
    assert words[0] == "a" and words[1] != "good" and words[2] == "film"  # "good" misspelt: the prediction flipped
    assert words[3:5] == ["0.5", "0.5"]  # "a dull film" holds: accuracy under attack 0.5, success rate 1 of 2
