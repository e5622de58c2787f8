"""The causal-LM example (examples/causal_lm.py): a few LoRA steps with NEFTune and FreeLB on the shipped data."""

from __future__ import annotations

import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

pytest.importorskip("transformers")
pytest.importorskip("peft")

import causal_lm  # noqa: E402


@pytest.mark.parametrize("method", ["neftune", "freelb"])
def test_example_runs_fast_and_lowers_the_perplexity(method, capsys):
    results = causal_lm.main(["--fast", "--method", method])
    out = capsys.readouterr().out
    assert "dev perplexity (per token)" in out and "under attack" in out
    assert results["ppl_after"] < results["ppl_before"]
    for key in ("token_acc_before", "token_acc_after", "robust_token_acc_before", "robust_token_acc_after"):
        assert 0.0 <= results[key] <= 1.0


def test_labels_mask_padding_and_prompt():
    tok = causal_lm.CharTokenizer(["positive: ab", "negative: abcd"])
    batch = tok.collate(["positive: ab", "negative: abcd"])
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (ids[attention == 0] == causal_lm.PAD).all() and attention[:, -1].all()  # padded on the left
    assert (labels[attention == 0] == -100).all()
    # labelled: the sentence and eos, not bos nor the "positive: " prompt
    assert (labels != -100).sum(1).tolist() == [3, 5]
