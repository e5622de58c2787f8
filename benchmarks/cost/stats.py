"""X and its spread over interleaved rounds.

For a clock (CPU or wall), every variant's time in round ``r`` is the median of its timed steps in that round;
then, per round and per method::

    X_r = (T_attack,r - T_plain,r) / T_fwd+bwd,r

X is the median of ``X_r`` over the rounds; its spread is given twice: the interquartile range of ``X_r``
(``q1``, ``q3``: how much the rounds disagree) and a 90% bootstrap interval of the median (``lo``, ``hi``: rounds
drawn with replacement, 2,000 times, seeded). Paired differences (ours - baseline, Lightning - loop) are taken
within each round first, so that a load change between rounds cancels out of them.
"""

from __future__ import annotations

import random
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence

from cost.clocks import Sample, clean_round
from cost.config import bar

Rounds = Dict[str, List[List[Sample]]]  # variant -> round -> timed steps


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    i = int(pos)
    j = min(i + 1, len(sorted_xs) - 1)
    return sorted_xs[i] + (sorted_xs[j] - sorted_xs[i]) * (pos - i)


def spread(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Median, interquartile range, 90% bootstrap interval of the median, min, max and count of ``values``."""
    xs = sorted(values)
    n = len(xs)
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(xs, k=n)) for _ in range(resamples)) if n > 1 else list(xs)
    value = quantile(xs, 0.5)
    return dict(value=value, q1=quantile(xs, 0.25), q3=quantile(xs, 0.75),
                lo=quantile(boot, 0.05), hi=quantile(boot, 0.95),
                min=xs[0], max=xs[-1], n=n, rounds=list(values))


def round_medians(rounds: Rounds, clock: str) -> List[Dict[str, float]]:
    """Per round: variant -> median time of its timed steps (seconds of ``clock``)."""
    n = len(next(iter(rounds.values())))
    return [{v: statistics.median(s.get(clock) for s in rounds[v][r]) for v in rounds} for r in range(n)]


def _per_round(meds: List[Dict[str, float]], fn: Callable[[Dict[str, float]], float]) -> List[float]:
    return [fn(m) for m in meds]


def x_table(rounds: Rounds, methods: Sequence[str], clock: str, lightning: bool,
            keep: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, Any]]:
    """Per method: ``ref``, ``ours`` (hand-written loop), ``ours_minus_ref``, and with Lightning ``lightning`` and
    ``lightning_minus_loop``, each a :func:`spread` over rounds (only the rounds in ``keep`` when given)."""
    meds = round_medians(rounds, clock)
    if keep is not None:
        meds = [meds[r] for r in keep]
    out: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        def x(m_: Dict[str, float], variant: str, plain: str = "plain") -> float:
            return (m_[variant] - m_[plain]) / m_["fwd_bwd"]

        row: Dict[str, Any] = {}
        if f"ref_{m}" in rounds:
            row["ref"] = spread(_per_round(meds, lambda d: x(d, f"ref_{m}")))
            row["ours_minus_ref"] = spread(_per_round(meds, lambda d: x(d, f"ours_{m}") - x(d, f"ref_{m}")))
        row["ours"] = spread(_per_round(meds, lambda d: x(d, f"ours_{m}")))
        if lightning:
            row["lightning"] = spread(_per_round(meds, lambda d: x(d, f"L_{m}", "L_plain")))
            row["lightning_minus_loop"] = spread(
                _per_round(meds, lambda d: x(d, f"L_{m}", "L_plain") - x(d, f"ours_{m}")))
        out[m] = row
    return out


def clean_rounds(rounds: Rounds) -> List[int]:
    """The rounds none of whose timed steps was descheduled (:func:`cost.clocks.clean_round`)."""
    n = len(next(iter(rounds.values())))
    return [r for r in range(n) if clean_round([s for v in rounds for s in rounds[v][r]])]


def median_ms(rounds: Rounds, clock: str) -> Dict[str, float]:
    """Per variant: the median of all its timed steps, in ms."""
    return {v: 1e3 * statistics.median(s.get(clock) for r in steps for s in r) for v, steps in rounds.items()}


def median_faults(rounds: Rounds) -> Dict[str, float]:
    """Per variant: the median of the minor page faults of its timed steps (:mod:`cost.allocator`)."""
    return {v: statistics.median(s.faults or 0 for r in steps for s in r) for v, steps in rounds.items()}


def verdict(x: Dict[str, Any], method: str) -> str:
    """``yes``: the whole interval at or under the method's bar (limit + its tolerance: 0.10, NEFTune 0.05); ``no``:
    the whole interval above; else ``undecided``."""
    line = bar(method)
    if x["hi"] <= line:
        return "yes"
    if x["lo"] > line:
        return "no"
    return "undecided"
