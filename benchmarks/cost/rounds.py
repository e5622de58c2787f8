"""The interleaved measurement of one model: load-free counts, warm-up, rounds, X with its spread, the load verdict.

Two designs (``Options.design``). ``"blocks"`` (here): in every round each variant runs once, in an order rotated by
one each round (no variant always follows the same one), so that a change of load between or within rounds hits
every variant alike over the run: a loop variant runs ``block_warmup`` untimed and ``steps`` timed steps, a Lightning
variant one short fit (``lightning_warmup`` untimed and ``steps`` timed steps); X is computed per round from the
variants' medians, which a round may take minutes apart. ``"paired"`` (:mod:`cost.paired`, the default): the steps
X is computed from run seconds apart, so that the bursts of a shared host (a step 30% slower for a few seconds) fall
on single cycles, which the median over cycles discards. The objects alive before the rounds are frozen out of the
cyclic garbage collector (``gc.freeze()``): a full collection of that heap (0.1-0.3 s) would otherwise land in a
random timed step.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from cost.clocks import LoadMonitor, Sample, Stamp, load_report
from cost.config import MODELS, arithmetic_variants, lightning_variants, loop_variants, per_model
from cost.lightning_runner import LightningRunner
from cost.loop import Loop, cuda_peaks, saved_state, sync_counts
from cost.models import build_model, make_batch
from cost.opcount import count_step, x_flops
from cost.stats import clean_rounds, median_faults, median_ms, round_medians, x_table

CLOCKS = ("cpu", "wall")


@dataclass
class Options:
    methods: List[str]
    rounds: Any = 9  # a count, or per model ("small:13,minilm:9")
    steps: Any = 3
    warmup: int = 2  # warm-up steps of every loop variant before the rounds
    block_warmup: int = 1  # untimed steps of a loop variant in every round, before its timed ones
    lightning_warmup: int = 1  # steps dropped at the start of every fit
    batch: Optional[int] = None
    seq: Optional[int] = None
    device: str = "cpu"
    precision: str = "fp32"
    lightning: bool = True
    references: bool = True
    count: bool = True  # the load-free counts (cost.opcount)
    peak_steps: int = 3
    verbose: bool = False
    design: str = "paired"  # "paired" (cost.paired) or "blocks" (below)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    """What both designs measure with: the model, the batch, the loop, the Lightning runner, the variants."""

    name: str
    model: Any
    batch_size: int
    seq: int
    loop: Loop
    runner: Optional[LightningRunner]
    sides: Tuple[str, ...]
    loop_variants: List[str]
    variants: List[str]
    counts: Dict[str, Any]
    n_rounds: int
    n_steps: int


def prepare(name: str, o: Options) -> Bench:
    """The model, loop and runner; the load-free counts (before any timing: they do not depend on the load); every
    variant warmed up; the heap frozen out of the garbage collector."""
    device = torch.device(o.device)
    spec = MODELS[name]
    model = build_model(name).to(device)
    batch_size, seq = o.batch or spec["batch"], o.seq or spec["seq"]
    batch = {k: v.to(device) for k, v in make_batch(model, batch_size, seq).items()}
    loop = Loop(model, batch, device, o.precision, o.methods, references=o.references)
    runner = LightningRunner(model, batch, device, o.precision, o.methods) if o.lightning else None
    sides = ("ref", "ours") if o.references else ("ours",)
    loop_vs = loop_variants(o.methods, sides)
    variants = loop_vs + (lightning_variants(o.methods) if runner is not None else [])

    counts: Dict[str, Any] = {}
    if o.count:
        counts = {v: count_step(model, loop.variant(v)) for v in loop_vs}
        if runner is not None:
            counts.update({v: runner.count(v) for v in lightning_variants(o.methods)})
        loop.opt.zero_grad(set_to_none=True)

    for _ in range(o.warmup):
        for v in loop_vs:
            loop.variant(v)()
    if runner is not None:
        if not o.count:  # the counted fits warmed Lightning up already
            for v in lightning_variants(o.methods):
                runner.fit(v, steps=1, warmup=1)
        runner.phases.clear()
    loop.snapshot_grads()
    gc.collect()
    gc.freeze()
    return Bench(name, model, batch_size, seq, loop, runner, sides, loop_vs, variants, counts,
                 per_model(name, o.rounds), per_model(name, o.steps))


def time_step(loop: Loop, fn: Any) -> Sample:
    """One timed step of a loop variant (the device synchronised around it)."""
    loop.synchronize()
    t0 = Stamp()
    fn()
    loop.synchronize()
    return t0.since()


def finish(b: Bench, o: Options, rounds: Dict[str, List[List[Sample]]], x: Dict[str, Any], x_wall_clean: Any,
           keep: List[int], arithmetic: Dict[str, List[float]], elapsed: float, system: Dict[str, Any]) -> Dict[str, Any]:
    """The result of one model, whichever the design: X, times, faults, counts, saved state, syncs, peaks, phases."""
    gc.unfreeze()
    loop, runner, counts = b.loop, b.runner, b.counts
    result: Dict[str, Any] = dict(
        model=b.name, design=o.design, batch=b.batch_size, seq=b.seq, params=sum(p.numel() for p in b.model.parameters()),
        weights=getattr(b.model, "weights_source", "random init"), rounds=b.n_rounds, steps=b.n_steps, seconds=elapsed,
        load=load_report([s for v in rounds for r in rounds[v] for s in r], system),
        X=x, clean_rounds=keep, X_wall_clean=x_wall_clean,
        median_ms={c: median_ms(rounds, c) for c in CLOCKS},
        median_faults=median_faults(rounds),
        arithmetic_ms={v: 1e3 * sorted(ts)[len(ts) // 2] for v, ts in arithmetic.items()},
        counts=counts,
        X_flops={v: x_flops(counts, v, "L_plain" if v.startswith("L_") else "plain")
                 for v in counts if v not in ("fwd_bwd", "plain", "L_plain")} if counts else {},
        saved=saved_state(loop),
        syncs=dict(loop=sync_counts(loop), lightning=runner.sync_counts() if runner is not None else {}),
        cuda_peaks=cuda_peaks(loop, o.peak_steps) if loop.device.type == "cuda" else None,
        steps_raw={v: [[s.as_dict() for s in r] for r in rs] for v, rs in rounds.items()},
    )
    if runner is not None:
        result["phases_ms"] = {c: runner.breakdown(c) for c in CLOCKS}
    return result


def measure_model(name: str, o: Options) -> Dict[str, Any]:
    """The model measured by ``o.design``: ``"blocks"`` (here) or ``"paired"`` (:mod:`cost.paired`)."""
    if o.design == "paired":
        from cost.paired import measure_model_paired

        return measure_model_paired(name, o)
    b = prepare(name, o)
    loop, runner, variants = b.loop, b.runner, b.variants
    rounds: Dict[str, List[List[Sample]]] = {v: [] for v in variants}
    arithmetic: Dict[str, List[float]] = {v: [] for v in arithmetic_variants(o.methods) if v.split("_")[0] in b.sides}
    arith_clock = time.process_time if loop.device.type == "cpu" else time.perf_counter
    monitor = LoadMonitor()
    t_start = time.perf_counter()
    for r in range(b.n_rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            if v.startswith("L_"):
                times = runner.fit(v, steps=b.n_steps, warmup=o.lightning_warmup)  # type: ignore[union-attr]
            else:
                fn = loop.variant(v)
                times = [time_step(loop, fn) for _ in range(o.block_warmup + b.n_steps)][o.block_warmup:]
            rounds[v].append(times)
        for v in arithmetic:
            arithmetic[v] += [loop.time_arithmetic(v, arith_clock) for _ in range(b.n_steps)]
        monitor.mark_round()
        if o.verbose:
            med = round_medians({v: [rounds[v][-1]] for v in variants}, "cpu")[0]
            print(f"  [{name}] round {r + 1}/{b.n_rounds} (cpu ms; load {monitor.rounds[-1]['loadavg1']:.2f}): "
                  + ", ".join(f"{k}={1e3 * t:.1f}" for k, t in med.items()), flush=True)
    elapsed = time.perf_counter() - t_start
    system = monitor.finish()
    keep = clean_rounds(rounds)
    lightning = runner is not None
    x = {c: x_table(rounds, o.methods, c, lightning) for c in CLOCKS}
    x_clean = x_table(rounds, o.methods, "wall", lightning, keep=keep) if len(keep) >= 3 else None
    return finish(b, o, rounds, x, x_clean, keep, arithmetic, elapsed, system)
