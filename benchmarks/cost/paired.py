"""The paired design: the steps one X is computed from run seconds apart.

On a shared host the speed of a core changes in bursts: a forward+backward of MiniLM-L6 took 650 ms in one step
and 1,170 ms in the next, while the steps of one variant in a row agree within 2-9%. When X is computed from the
medians of blocks run up to minutes apart (the ``"blocks"`` design), a burst that hits one block moves that round's X
by 0.2-0.5. Here, per method and round:

* the loop: ``steps`` cycles, each one step of ``fwd_bwd``, ``plain``, the baseline and ours, in an order rotated
  by one each cycle (a few seconds in all), and ``X_c = (T_ours - T_plain) / T_fwd+bwd`` within the cycle;
* Lightning: one fit whose callback attacks every other step (:meth:`LightningRunner.fit_alternating`): after two
  untimed steps, ``steps`` adjacent pairs (plain, attacked); ``X_c = (T_attacked - T_plain) / T_unit`` with the unit
  the plain step's own forward+backward (the phase timer's ``forward`` + ``backward``).

X is the median of ``X_c`` over the cycles (``rounds x steps``), with its 90% bootstrap interval and interquartile
range (:func:`cost.stats.spread`); a burst falls on single cycles, which the median discards. The methods' order is
rotated by one each round. The times are also pooled per variant and round (``fwd_bwd``, ``plain`` and ``L_plain``
from every method's cycles) for the load report, the medians and the page faults.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from cost.clocks import LoadMonitor, Sample
from cost.rounds import CLOCKS, Options, finish, prepare, time_step
from cost.config import arithmetic_variants
from cost.stats import clean_rounds, spread

Cycle = Dict[str, Sample]


def x_of(cycle: Cycle, variant: str, clock: str, plain: str = "plain", unit: str = "fwd_bwd") -> float:
    return (cycle[variant].get(clock) - cycle[plain].get(clock)) / cycle[unit].get(clock)


def x_paired(loop: Dict[str, List[Cycle]], lightning: Dict[str, List[Cycle]], rounds_of: Dict[str, List[int]],
             methods: Sequence[str], clock: str, keep: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, Any]]:
    """Per method, as :func:`cost.stats.x_table`: ``ref``, ``ours``, ``ours_minus_ref`` and ``lightning``,
    ``lightning_minus_loop`` (cycle ``i`` of the loop with pair ``i`` of the fits: same round, same index), each a
    :func:`~cost.stats.spread` over cycles (those of the rounds in ``keep`` when given)."""
    out: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        take = [i for i, r in enumerate(rounds_of[m]) if keep is None or r in keep]
        cycles = [loop[m][i] for i in take]
        row: Dict[str, Any] = {}
        ours = [x_of(c, f"ours_{m}", clock) for c in cycles]
        if cycles and f"ref_{m}" in cycles[0]:
            ref = [x_of(c, f"ref_{m}", clock) for c in cycles]
            row["ref"] = spread(ref)
            row["ours_minus_ref"] = spread([o - r for o, r in zip(ours, ref)])
        row["ours"] = spread(ours)
        if lightning.get(m):
            pairs = [lightning[m][i] for i in take]
            lx = [x_of(p, f"L_{m}", clock, "L_plain", "L_unit") for p in pairs]
            row["lightning"] = spread(lx)
            row["lightning_minus_loop"] = spread([a - b for a, b in zip(lx, ours)])
        out[m] = row
    return out


def measure_model_paired(name: str, o: Options) -> Dict[str, Any]:
    b = prepare(name, o)
    loop, runner = b.loop, b.runner
    methods = list(o.methods)
    cycles: Dict[str, List[Cycle]] = {m: [] for m in methods}
    pairs: Dict[str, List[Cycle]] = {m: [] for m in methods}
    rounds_of: Dict[str, List[int]] = {m: [] for m in methods}
    pooled: Dict[str, List[List[Sample]]] = {v: [] for v in b.variants}  # variant -> round -> steps
    arithmetic: Dict[str, List[float]] = {v: [] for v in arithmetic_variants(methods) if v.split("_")[0] in b.sides}
    arith_clock = time.process_time if loop.device.type == "cpu" else time.perf_counter
    monitor = LoadMonitor()
    t_start = time.perf_counter()
    for r in range(b.n_rounds):
        for v in pooled:
            pooled[v].append([])
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            variants = ["fwd_bwd", "plain"] + [f"{side}_{m}" for side in b.sides]
            for i in range(b.n_steps):
                cycle: Cycle = {}
                for v in variants[i % len(variants):] + variants[: i % len(variants)]:
                    cycle[v] = time_step(loop, loop.variant(v))
                    pooled[v][-1].append(cycle[v])
                cycles[m].append(cycle)
                rounds_of[m].append(r)
            if runner is not None:
                for pair in runner.fit_alternating(m, pairs=b.n_steps):
                    pairs[m].append(pair)
                    pooled["L_plain"][-1].append(pair["L_plain"])
                    pooled[f"L_{m}"][-1].append(pair[f"L_{m}"])
        for v in arithmetic:
            arithmetic[v] += [loop.time_arithmetic(v, arith_clock) for _ in range(b.n_steps)]
        monitor.mark_round()
        if o.verbose:
            x = x_paired(cycles, pairs, rounds_of, methods, "cpu", keep=[r])
            print(f"  [{name}] round {r + 1}/{b.n_rounds} (X by cpu, median of the round's cycles; load "
                  f"{monitor.rounds[-1]['loadavg1']:.2f}): "
                  + ", ".join(f"{m}={x[m]['ours']['value']:.2f}/{x[m]['lightning']['value']:.2f}" if "lightning" in x[m]
                              else f"{m}={x[m]['ours']['value']:.2f}" for m in methods), flush=True)
    elapsed = time.perf_counter() - t_start
    system = monitor.finish()
    keep = clean_rounds(pooled)
    x = {c: x_paired(cycles, pairs, rounds_of, methods, c) for c in CLOCKS}
    x_clean = x_paired(cycles, pairs, rounds_of, methods, "wall", keep=keep) if len(keep) >= 3 else None
    result = finish(b, o, pooled, x, x_clean, keep, arithmetic, elapsed, system)
    result["cycles"] = {m: len(cycles[m]) for m in methods}
    return result
