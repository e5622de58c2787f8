"""Reference outputs of TextAttack's own DeepWordBug recipe on shared cases, for ``tests/test_text_attack.py``.

Runs ``textattack.attack_recipes.DeepWordBugGao2018.build(model_wrapper)`` (textattack 0.3.11) on the cases of
``tests/text_attack_cases.py`` (a hand-made bag-of-words classifier and the pretrained MiniLM as a zero-shot
classifier), each under a few global seeds, and records for every attack: TextAttack's word order (its
``[UNK]`` importance ranking), every random character draw of the four transformations (the word and what each
transformation proposed), the result (status, adversarial text, ``num_queries``, the goal function's total query
count). The test replays those draws through ``lightning_adv.core.text_attack.deepwordbug_attack`` and checks that
it makes the same choices and counts.

TextAttack is not a dependency of the project (its dependency tree pins ``transformers<5`` through flair, and
``import textattack`` downloads NLTK data and a stanza model). It runs offline, in a virtual environment on top of
the project's, installed without its dependency tree, with the post-install marker set, NLTK's English stopword
list written from :data:`lightning_adv.core.text_attack.NLTK_ENGLISH_STOPWORDS`, and stand-ins for ``flair`` and
``jieba`` (imported at module level by TextAttack; DeepWordBug uses neither)::

    python -m venv --system-site-packages /tmp/ta
    /tmp/ta/bin/pip install --no-deps textattack==0.3.11 lru-dict editdistance nltk Levenshtein rapidfuzz langdetect \\
        pandas pinyin OpenHowNet anytree lemminflect more-itertools num2words word2number language-tool-python toml \\
        bert_score datasets multiprocess pyarrow dill xxhash terminaltables
    HF_HUB_OFFLINE=1 /tmp/ta/bin/python benchmarks/textattack_reference.py        # writes the JSON fixture
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEEDS = (0, 1, 2)


def offline_textattack() -> None:
    """Make ``import textattack`` work offline (see the module docstring)."""
    from lightning_adv.core.text_attack import NLTK_ENGLISH_STOPWORDS

    work = tempfile.mkdtemp(prefix="textattack_offline_")
    cache = os.path.join(work, "cache")
    os.makedirs(cache)
    open(os.path.join(cache, "post_install_check_3"), "w").close()  # the marker: no NLTK / stanza downloads
    os.environ["TA_CACHE_DIR"] = cache
    corpus = os.path.join(work, "nltk_data", "corpora", "stopwords")
    os.makedirs(corpus)
    with open(os.path.join(corpus, "english"), "w") as f:
        f.write("\n".join(sorted(NLTK_ENGLISH_STOPWORDS)) + "\n")
    os.environ["NLTK_DATA"] = os.path.join(work, "nltk_data")
    flair = types.ModuleType("flair")
    flair.__path__ = []
    flair.data = types.ModuleType("flair.data")
    flair.data.Tokenizer = type("Tokenizer", (), {})
    flair.data.Sentence = object
    flair.models = types.ModuleType("flair.models")
    flair.models.SequenceTagger = object
    jieba = types.ModuleType("jieba")
    jieba.cut = lambda s, cut_all=False: s.split()
    sys.modules.update({"flair": flair, "flair.data": flair.data, "flair.models": flair.models, "jieba": jieba})


def main() -> None:
    offline_textattack()
    import numpy as np
    import textattack
    from textattack.attack_recipes import DeepWordBugGao2018
    from textattack.attack_results import FailedAttackResult, SkippedAttackResult, SuccessfulAttackResult
    from textattack.models.wrappers import ModelWrapper

    import text_attack_cases as cases

    class Wrapper(ModelWrapper):
        def __init__(self, fn):
            self.fn = fn
            self.model = types.SimpleNamespace()  # TextAttack reads model_wrapper.model.__class__

        def __call__(self, texts):
            return self.fn(list(texts)).float()

    from textattack import Attack
    from textattack.constraints.overlap import LevenshteinEditDistance
    from textattack.constraints.pre_transformation import RepeatModification, StopwordModification
    from textattack.goal_functions import UntargetedClassification
    from textattack.search_methods import GreedyWordSwapWIR
    from textattack.transformations import (
        CompositeTransformation, WordSwapNeighboringCharacterSwap, WordSwapRandomCharacterDeletion,
        WordSwapRandomCharacterInsertion, WordSwapRandomCharacterSubstitution,
    )

    def components(wrapper, max_edit_distance):
        """The recipe built from its components with another Levenshtein bound."""
        transformation = CompositeTransformation([
            WordSwapNeighboringCharacterSwap(), WordSwapRandomCharacterSubstitution(), WordSwapRandomCharacterDeletion(),
            WordSwapRandomCharacterInsertion(),
        ])
        constraints = [RepeatModification(), StopwordModification(), LevenshteinEditDistance(max_edit_distance)]
        return Attack(UntargetedClassification(wrapper), constraints, transformation, GreedyWordSwapWIR())

    out = {"textattack": textattack.__name__ + " " + _version("textattack"), "seeds": list(SEEDS), "attacks": []}
    configs = [  # (model, cases, max_edit_distance): 30 is the recipe itself, DeepWordBugGao2018.build
        ("keyword", cases.KEYWORD_CASES, 30), ("keyword", cases.KEYWORD_CASES, 3), ("minilm", cases.sst2_sample_cases(8), 30),
    ]
    for model_name, examples, max_edit_distance in configs:
        wrapper = Wrapper(cases.MODELS[model_name]())
        attack = DeepWordBugGao2018.build(wrapper) if max_edit_distance == 30 else components(wrapper, max_edit_distance)
        draws = []
        composite = attack.transformation
        for t in composite.transformations:
            original = t._get_replacement_words

            def recorded(word, _original=original, _name=type(t).__name__):
                outs = _original(word)
                draws.append((_name, word, list(outs)))
                return outs

            t._get_replacement_words = recorded
        search = attack.search_method
        orders = []
        original_order = search._get_index_order

        def index_order(text, *a, **k):
            order, over = original_order(text, *a, **k)
            orders.append([int(i) for i in order])
            return order, over

        search._get_index_order = index_order
        for seed in SEEDS:
            for text, label in examples:
                random.seed(seed)
                np.random.seed(seed)
                draws.clear()
                orders.clear()
                result = attack.attack(text, label)
                status = {SuccessfulAttackResult: "succeeded", FailedAttackResult: "failed", SkippedAttackResult: "skipped"}[type(result)]
                calls = [draws[i: i + 4] for i in range(0, len(draws), 4)]
                assert all([c[0] for c in call] == ["WordSwapNeighboringCharacterSwap", "WordSwapRandomCharacterSubstitution",
                                                    "WordSwapRandomCharacterDeletion", "WordSwapRandomCharacterInsertion"]
                           and len({c[1] for c in call}) == 1 for call in calls)
                original_words = result.original_result.attacked_text.words
                entry = {
                    "model": model_name, "max_edit_distance": max_edit_distance, "seed": seed, "text": text, "label": label, "status": status,
                    "perturbed_text": result.perturbed_result.attacked_text.text,
                    "num_queries": int(result.num_queries),
                    "total_queries": int(attack.goal_function.num_queries),
                    "order": orders[0] if orders else [],
                    "draws": [{"word": call[0][1], "candidates": [c[2] for c in call]} for call in calls],
                    "words": list(original_words),
                    "words_changed": len(result.original_result.attacked_text.all_words_diff(result.perturbed_result.attacked_text))
                    if status == "succeeded" else 0,
                    "score": float(result.perturbed_result.score),
                }
                out["attacks"].append(entry)
                print(f"{model_name} lev {max_edit_distance} seed {seed} {status:9s} q={entry['total_queries']:3d} ({entry['num_queries']:3d}) "
                      f"{text[:50]!r} -> {entry['perturbed_text'][:60]!r}", flush=True)
    os.makedirs(os.path.dirname(cases.REFERENCE), exist_ok=True)
    with open(cases.REFERENCE, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {cases.REFERENCE}: {len(out['attacks'])} attacks")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
