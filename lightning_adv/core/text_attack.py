"""Text-level robustness: accuracy under the DeepWordBug character-level attack (Gao et al. 2018), black-box.

A faithful, seeded re-implementation of TextAttack's ``DeepWordBugGao2018`` recipe (textattack 0.3.11), in plain
Python on top of any ``predict_fn(list_of_texts) -> scores``: no TextAttack, NLTK or Lightning import, no download.
The recipe, component by component:

* **goal** ``UntargetedClassification``: an example whose clean prediction is already wrong is *skipped* (it counts
  as not robust); otherwise the attack succeeds when the predicted class is no longer the label. The score it
  climbs is ``1 - p(label)`` (softmax applied when the rows of ``predict_fn``'s output do not sum to 1, as TextAttack
  does).
* **words**: TextAttack's ``words_from_text`` (split on white space, keep runs of word characters, ``'-_*@`` and a few
  homoglyphs, strip ``'-_*@`` from both ends); a word is replaced in place in the text, punctuation and spacing kept.
* **search** ``GreedyWordSwapWIR(wir_method="unk")``: every modifiable word is replaced in turn by ``[UNK]``; the
  words are then visited in order of decreasing score (most important first), each once. At a word, every
  candidate is scored; the best one is kept if it raises the score over the current text's, and the attack stops
  at the first kept candidate that flips the prediction. Candidates are sorted by text before the (stable) sort by
  score, as in TextAttack, so ties between candidates go to the alphabetically first.
* **transformation** ``CompositeTransformation`` of one random draw each of ``WordSwapNeighboringCharacterSwap``
  (two neighbouring characters exchanged), ``WordSwapRandomCharacterSubstitution`` (one character replaced by a
  random ASCII letter), ``WordSwapRandomCharacterDeletion`` (one character deleted) and
  ``WordSwapRandomCharacterInsertion`` (a random ASCII letter inserted before one of the characters; never after
  the last, as in TextAttack): at most 4 candidates per word, duplicates, unchanged words and words of one
  character dropped. The draws are made when the search reaches the word, as in TextAttack.
* **constraints** ``RepeatModification`` (a word is changed at most once), ``StopwordModification`` (NLTK's English
  stopword list, compared case-sensitively as TextAttack does; :data:`NLTK_ENGLISH_STOPWORDS`, shipped here) and
  ``LevenshteinEditDistance(30)`` (character edit distance between the *original* text and a candidate, so the
  bound holds for the final adversarial text).

What is reported (:func:`summarize`, the same definitions as TextAttack's attack metrics): clean accuracy, accuracy
under attack (failed attacks over all examples), attack success rate (successes over successes + failures),
mean queries (over the examples not skipped) and mean perturbed-word % (words changed over words, over the
successful attacks).

Where ours differs from TextAttack, and why:

* **Randomness.** TextAttack draws positions from NumPy's and letters from Python's *global* generators, so its
  results depend on everything else the process drew. Ours draws from one ``random.Random`` per example, seeded
  by ``(seed, text)``: the attack on a sentence is a function of the model, the sentence and the seed only, the
  same whatever the other examples, their order or the batching. Given the same draws, the search makes the same
  choices (``tests/test_text_attack.py`` replays TextAttack's own draws on shared cases and compares every
  step).
* **Ties in word importance.** TextAttack orders the words with NumPy's ``argsort`` (not stable) over a list that
  comes from a set; words with exactly equal ``[UNK]`` scores may come in any order. Ours breaks such ties by
  position (first word first). Real models rarely tie; hand-made ones do.
* **Queries** are counted as TextAttack counts them (``AttackResult.num_queries``): every text given to the model
  for the example, the clean text, the ``[UNK]`` texts and every candidate. TextAttack caches model outputs within
  an example (a repeated text costs no forward but still counts); so do we.
* **Query budget.** ``max_queries`` follows TextAttack's ``query_budget`` (a batch is cut at the budget and the
  search ends there).
* Chinese text (which TextAttack segments with jieba) and paired inputs are not supported.

The function batches the model calls of several examples together (``batch_size`` texts per call); each example's
result does not depend on it, up to the model's own rounding between batch compositions (padding).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Generator, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "NLTK_ENGLISH_STOPWORDS", "TextAttackResult", "deepwordbug_attack", "deepwordbug_candidates", "levenshtein",
    "select_examples", "summarize", "word_spans", "words_from_text",
]

#: NLTK's English stopword list (``nltk.corpus.stopwords.words("english")``, the 179 words of the NLTK data that
#: TextAttack's ``StopwordModification`` used when the recipe was published). Lower case; compared case-sensitively.
NLTK_ENGLISH_STOPWORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
    himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
    that that'll these those am is are was were be been being have has had having do does did doing a an the and but
    if or because as until while of at by for with about against between into through during before after above
    below to from up down in out on off over under again further then once here there when where why how all any
    both each few more most other some such no nor not only own same so than too very s t can will just don don't
    should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn
    hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn
    wasn't weren weren't won won't wouldn wouldn't""".split()
)

_HOMOGLYPHS = "˗৭Ȣ𝟕бƼᏎƷᒿlO`ɑЬϲԁе𝚏ɡհіϳ𝒌ⅼｍոорԛⲅѕ𝚝սѵԝ×уᴢ"  # as in textattack.shared.utils.strings
_EXCEPTIONS = "'-_*@"
_WORD = re.compile(f"[\\w{_HOMOGLYPHS}'\\-_\\*@]+")
_TOKEN = re.compile(r"\S+")

STATUSES = ("skipped", "failed", "succeeded")


def word_spans(text: str) -> List[Tuple[int, int]]:
    """``(start, end)`` of every word of ``text``, the words of TextAttack's ``words_from_text``.

    >>> text = "it 's a well-made , 'charming' film ."
    >>> [text[a:b] for a, b in word_spans(text)]
    ['it', 's', 'a', 'well-made', 'charming', 'film']
    """
    spans = []
    for token in _TOKEN.finditer(text):
        tok = token.group()
        core = tok.strip(_EXCEPTIONS)
        if not core:
            continue
        base = token.start() + len(tok) - len(tok.lstrip(_EXCEPTIONS))
        for m in _WORD.finditer(core):
            w = m.group()
            stripped = w.strip(_EXCEPTIONS)
            if stripped:
                start = base + m.start() + len(w) - len(w.lstrip(_EXCEPTIONS))
                spans.append((start, start + len(stripped)))
    return spans


def words_from_text(text: str) -> List[str]:
    """The words of ``text`` as TextAttack splits them (not lower-cased, despite TextAttack's docstring)."""
    return [text[a:b] for a, b in word_spans(text)]


def levenshtein(a: str, b: str, bound: Optional[int] = None) -> int:
    """Character edit distance (insertions, deletions, substitutions: cost 1 each), as ``editdistance.eval``.

    With ``bound``, any distance above it is returned as ``bound + 1`` (a banded computation, faster).

    >>> levenshtein("kitten", "sitting"), levenshtein("good", "godo"), levenshtein("a" * 50, "b" * 50, bound=3)
    (3, 2, 4)
    """
    i = 0
    while i < len(a) and i < len(b) and a[i] == b[i]:
        i += 1
    a, b = a[i:], b[i:]
    j = 0
    while j < len(a) and j < len(b) and a[-1 - j] == b[-1 - j]:
        j += 1
    if j:
        a, b = a[:-j], b[:-j]
    n, m = len(a), len(b)
    cap = n + m if bound is None else bound + 1
    if abs(n - m) >= cap:
        return cap
    if n == 0 or m == 0:
        return min(n + m, cap)
    band = cap  # cells farther than the cap from the diagonal cannot be within it
    prev = [min(k, cap) for k in range(m + 1)]
    for r in range(1, n + 1):
        lo, hi = max(1, r - band), min(m, r + band)
        cur = [cap] * (m + 1)
        cur[0] = min(r, cap)
        ar = a[r - 1]
        best = cur[0] if lo == 1 else cap
        for c in range(lo, hi + 1):
            v = prev[c - 1] + (ar != b[c - 1])
            if prev[c] + 1 < v:
                v = prev[c] + 1
            if cur[c - 1] + 1 < v:
                v = cur[c - 1] + 1
            if v > cap:
                v = cap
            cur[c] = v
            if v < best:
                best = v
        if best >= cap:
            return cap
        prev = cur
    return min(prev[m], cap)


def deepwordbug_candidates(word: str, rng: random.Random, letters: str = string.ascii_letters) -> List[str]:
    """One random draw of each of DeepWordBug's four character transformations of ``word``, in TextAttack's order
    (swap, substitution, deletion, insertion); nothing for a word of one character. May contain duplicates or
    ``word`` itself (a swap of two equal letters, a letter substituted by itself): the attack drops them.

    >>> deepwordbug_candidates("good", random.Random(0))
    ['good', 'gooc', 'god', 'goozd']
    """
    n = len(word)
    if n <= 1:
        return []
    i = rng.randrange(0, n - 1)  # np.random.randint(0, len - 1): the pair (i, i + 1)
    swap = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    i = rng.randrange(0, n)
    sub = word[:i] + rng.choice(letters) + word[i + 1:]
    i = rng.randrange(0, n)
    dele = word[:i] + word[i + 1:]
    i = rng.randrange(0, n)  # np.random.randint(0, len): before character i, never after the last
    ins = word[:i] + rng.choice(letters) + word[i:]
    return [swap, sub, dele, ins]


@dataclass
class TextAttackResult:
    """The attack on one example."""

    text: str
    label: int
    status: str
    """``"skipped"`` (the clean prediction is already wrong), ``"failed"`` or ``"succeeded"``."""
    perturbed_text: str
    """The adversarial text for a success; the text as the search left it otherwise (the clean one if skipped)."""
    clean_pred: int
    pred: int
    """The prediction on ``perturbed_text``."""
    queries: int
    """Texts given to the model for this example, every one counted (TextAttack's ``num_queries``)."""
    num_words: int
    words_changed: int
    edit_distance: int
    """Levenshtein distance between ``text`` and ``perturbed_text``."""
    score: float
    """``1 - p(label)`` on ``perturbed_text``."""
    order: List[int] = field(default_factory=list)
    """Word indices in the order the search visits them (decreasing ``[UNK]`` importance)."""

    @property
    def perturbed_word_pct(self) -> float:
        return 100.0 * self.words_changed / self.num_words if self.num_words else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


PredictFn = Callable[[List[str]], Any]
CandidatesFn = Callable[[str, random.Random], List[str]]


def _probabilities(scores: Any, n: int) -> torch.Tensor:
    """TextAttack's ``ClassificationGoalFunction._process_model_outputs``: softmax unless the rows sum to 1."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    scores = scores.detach().float().cpu()
    if scores.ndim == 1 and n == 1:
        scores = scores.unsqueeze(0)
    if scores.ndim != 2 or scores.shape[0] != n:
        raise ValueError(f"predict_fn returned scores of shape {tuple(scores.shape)} for {n} texts; expected [{n}, num_classes].")
    if not bool(((scores.sum(dim=1) - 1).abs() < 1e-6).all()):
        scores = torch.softmax(scores, dim=1)
    return scores


class _Query:
    """What an attack generator yields: texts to score; it is sent back their probabilities."""

    __slots__ = ("texts",)

    def __init__(self, texts: List[str]) -> None:
        self.texts = texts


def _replace(text: str, span: Tuple[int, int], word: str) -> str:
    return text[: span[0]] + word + text[span[1]:]


def _attack_one(
    text: str, label: int, rng: random.Random, stopwords: frozenset, max_edit_distance: Optional[int], unk_token: str,
    candidates_fn: CandidatesFn, max_queries: Optional[int],
) -> Generator[_Query, List[torch.Tensor], TextAttackResult]:
    """The recipe on one example, as a generator: it yields the texts it needs scored and gets their probabilities."""
    queries = 0
    cache: Dict[str, torch.Tensor] = {}

    def score(texts: List[str]) -> Generator[_Query, List[torch.Tensor], Tuple[List[torch.Tensor], bool]]:
        nonlocal queries
        if max_queries is not None:
            texts = texts[: max(0, max_queries - queries)]
        queries += len(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        if todo:
            probs = yield _Query(todo)
            cache.update(zip(todo, probs))
        return [cache[t] for t in texts], max_queries is not None and queries >= max_queries

    spans = word_spans(text)
    words = [text[a:b] for a, b in spans]
    (p0,), over = yield from score([text])
    clean_pred = int(p0.argmax())

    def result(status: str, current: str, probs: torch.Tensor, order: List[int]) -> TextAttackResult:
        new_words = words_from_text(current)
        changed = sum(1 for a, b in zip(words, new_words) if a != b)  # TextAttack's all_words_diff
        return TextAttackResult(
            text=text, label=label, status=status, perturbed_text=current, clean_pred=clean_pred, pred=int(probs.argmax()),
            queries=queries, num_words=len(words), words_changed=changed if status == "succeeded" else 0,
            edit_distance=levenshtein(text, current), score=float(1 - probs[label]), order=order,
        )

    if clean_pred != label:
        return result("skipped", text, p0, [])
    # word importance: each modifiable word replaced by the unk token (StopwordModification, RepeatModification)
    indices = [k for k, w in enumerate(words) if w not in stopwords]
    probs, over = yield from score([_replace(text, spans[k], unk_token) for k in indices])
    scores = [float(1 - p[label]) for p in probs]
    order = [indices[k] for k in sorted(range(len(scores)), key=lambda k: -scores[k])]  # stable: ties by position
    current, cur_probs, cur_score = text, p0, float(1 - p0[label])
    modified: set = set()
    for idx in order:
        if over:
            break
        cur_spans = word_spans(current)
        if idx >= len(cur_spans):
            continue
        word = current[cur_spans[idx][0]:cur_spans[idx][1]]
        if idx in modified or word in stopwords:
            continue
        seen = set()
        cands = []
        for new in candidates_fn(word, rng):
            if new == word:
                continue
            cand = _replace(current, cur_spans[idx], new)
            if cand in seen or cand == current:
                continue
            seen.add(cand)
            if max_edit_distance is not None and levenshtein(text, cand, max_edit_distance) > max_edit_distance:
                continue
            cands.append(cand)
        if not cands:
            continue
        cands.sort()
        probs, over = yield from score(cands)
        if not probs:
            break
        ranked = sorted(zip(cands, probs), key=lambda cp: -float(1 - cp[1][label]))
        best, best_probs = ranked[0]
        best_score = float(1 - best_probs[label])
        if best_score <= cur_score:
            continue
        current, cur_probs, cur_score = best, best_probs, best_score
        modified.add(idx)
        if int(best_probs.argmax()) != label:
            return result("succeeded", current, cur_probs, order)
    return result("failed", current, cur_probs, order)


def deepwordbug_attack(
    predict_fn: PredictFn,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    seed: int = 0,
    max_edit_distance: Optional[int] = 30,
    stopwords: Optional[Iterable[str]] = None,
    unk_token: str = "[UNK]",
    letters: str = string.ascii_letters,
    max_queries: Optional[int] = None,
    batch_size: int = 64,
    candidates_fn: Optional[CandidatesFn] = None,
) -> Tuple[List[TextAttackResult], Dict[str, float]]:
    """Attack every ``(text, label)`` with DeepWordBug; return the per-example results and :func:`summarize`'s summary.

    Args:
        predict_fn: ``predict_fn(texts: list[str]) -> [len(texts), num_classes]`` logits or probabilities (a tensor,
            array or nested list), the model in the mode it is to be measured in (eval). Called with at most
            ``batch_size`` texts, under no gradient.
        texts, labels: the examples and their integer labels.
        seed: the seed of the random character draws (each example's generator is seeded by ``(seed, text)``).
        max_edit_distance: the Levenshtein bound between the original and the adversarial text (30 in the recipe;
            None: no bound).
        stopwords: words never modified; None: :data:`NLTK_ENGLISH_STOPWORDS`.
        unk_token: the word that replaces each word in turn to rank the words (TextAttack's ``"[UNK]"``).
        letters: the letters drawn by substitution and insertion (TextAttack: ``string.ascii_letters``).
        max_queries: TextAttack's ``query_budget`` per example; None: unlimited (the recipe).
        batch_size: texts per ``predict_fn`` call, gathered across examples.
        candidates_fn: ``candidates_fn(word, rng) -> list[str]``, the replacements proposed for a word; None:
            :func:`deepwordbug_candidates` (one draw of each of the four transformations).

    Example: a bag-of-words classifier that keys on "good"; the attack misspells it and the prediction flips.

        >>> def predict(texts):
        ...     return [[0.0, 2.0] if "good" in t.split() else [2.0, 0.0] for t in texts]
        >>> results, summary = deepwordbug_attack(predict, ["a good film", "a film"], [1, 0], seed=0)
        >>> results[0].status, results[0].perturbed_text, results[0].queries
        ('succeeded', 'a gJod film', 6)
        >>> summary["clean_acc"], summary["attack_acc"], summary["attack_success_rate"]
        (1.0, 0.5, 0.5)
    """
    texts, labels = list(texts), [int(y) for y in labels]
    if len(texts) != len(labels):
        raise ValueError(f"deepwordbug_attack: {len(texts)} texts but {len(labels)} labels.")
    if batch_size < 1:
        raise ValueError(f"deepwordbug_attack(batch_size={batch_size}): batch_size must be >= 1.")
    if max_edit_distance is not None and max_edit_distance < 0:
        raise ValueError(f"deepwordbug_attack(max_edit_distance={max_edit_distance}): must be >= 0 or None.")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"deepwordbug_attack(max_queries={max_queries}): must be >= 1 or None.")
    stop = NLTK_ENGLISH_STOPWORDS if stopwords is None else frozenset(stopwords)
    propose = candidates_fn or (lambda word, rng: deepwordbug_candidates(word, rng, letters))
    results: List[Optional[TextAttackResult]] = [None] * len(texts)
    pending: Dict[int, Tuple[Generator, _Query]] = {}
    next_example = 0

    def start(k: int) -> None:
        gen = _attack_one(texts[k], labels[k], random.Random(f"{seed}\x00{texts[k]}"), stop, max_edit_distance,
                          unk_token, propose, max_queries)
        advance(k, gen, None)

    def advance(k: int, gen: Generator, sent: Optional[List[torch.Tensor]]) -> None:
        try:
            query = gen.send(sent) if sent is not None else next(gen)
        except StopIteration as stop_it:
            results[k] = stop_it.value
            pending.pop(k, None)
            return
        pending[k] = (gen, query)

    with torch.no_grad():
        while next_example < len(texts) or pending:
            # keep enough examples in flight to fill a batch
            while next_example < len(texts) and sum(len(q.texts) for _, q in pending.values()) < batch_size:
                start(next_example)
                next_example += 1
            if not pending:
                continue
            # one model call over the queued texts of the examples in flight, in example order
            flat: List[Tuple[int, str]] = [(k, t) for k in sorted(pending) for t in pending[k][1].texts]
            outputs: Dict[int, List[torch.Tensor]] = {k: [] for k in pending}
            for i in range(0, len(flat), batch_size):
                chunk = flat[i: i + batch_size]
                probs = _probabilities(predict_fn([t for _, t in chunk]), len(chunk))
                for (k, _), p in zip(chunk, probs):
                    outputs[k].append(p)
            for k in sorted(outputs):
                gen, _ = pending[k]
                advance(k, gen, outputs[k])
    done = [r for r in results if r is not None]
    return done, summarize(done)


def summarize(results: Sequence[TextAttackResult]) -> Dict[str, float]:
    """TextAttack's attack metrics over ``results``: ``clean_acc``, ``attack_acc`` (accuracy under attack: failed
    attacks over all examples), ``attack_success_rate`` (succeeded / (succeeded + failed); 0 when there is none, as
    TextAttack), ``queries`` (mean over the examples not skipped), ``perturbed_word_pct`` (mean % of words changed,
    over the successful attacks; NaN when there is none), ``edit_distance`` (mean over the successes), and the
    counts ``n``, ``succeeded``, ``failed``, ``skipped``. Fractions in [0, 1], except the percentage."""
    n = len(results)
    count = {s: sum(1 for r in results if r.status == s) for s in STATUSES}
    attacked = [r for r in results if r.status != "skipped"]
    wins = [r for r in results if r.status == "succeeded"]
    nan = float("nan")
    return {
        "n": float(n),
        "clean_acc": len(attacked) / n if n else nan,
        "attack_acc": count["failed"] / n if n else nan,
        "attack_success_rate": count["succeeded"] / len(attacked) if attacked else 0.0,
        "queries": sum(r.queries for r in attacked) / len(attacked) if attacked else nan,
        "perturbed_word_pct": sum(r.perturbed_word_pct for r in wins) / len(wins) if wins else nan,
        "edit_distance": sum(r.edit_distance for r in wins) / len(wins) if wins else nan,
        **{s: float(count[s]) for s in STATUSES},
    }


def select_examples(n_total: int, num: Optional[int], seed: int) -> List[int]:
    """``num`` indices out of ``range(n_total)``, drawn with ``random.Random(seed)`` and sorted; all if ``num`` is None
    or not smaller.

    >>> select_examples(10, 3, 0), select_examples(3, 5, 0)
    ([0, 6, 9], [0, 1, 2])
    """
    if num is None or num >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), num))
