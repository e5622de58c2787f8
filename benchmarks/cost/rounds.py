"""The interleaved measurement of one model: load-free counts, warm-up, rounds, X with its spread, the load verdict.

In every round each variant runs once, in an order rotated by one each round (no variant always follows the same
one), so that a change of load between or within rounds hits every variant alike over the run: a loop variant runs
``block_warmup`` untimed and ``steps`` timed steps, a Lightning variant one short fit (``lightning_warmup`` untimed
and ``steps`` timed steps). The objects alive before the rounds are frozen out of the cyclic garbage collector
(``gc.freeze()``): a full collection of that heap (0.1-0.3 s) would otherwise land in a random timed step.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    extra: Dict[str, Any] = field(default_factory=dict)


def measure_model(name: str, o: Options) -> Dict[str, Any]:
    device = torch.device(o.device)
    spec = MODELS[name]
    n_rounds, n_steps = per_model(name, o.rounds), per_model(name, o.steps)
    model = build_model(name).to(device)
    batch_size, seq = o.batch or spec["batch"], o.seq or spec["seq"]
    batch = {k: v.to(device) for k, v in make_batch(model, batch_size, seq).items()}
    loop = Loop(model, batch, device, o.precision, o.methods, references=o.references)
    runner = LightningRunner(model, batch, device, o.precision, o.methods) if o.lightning else None
    sides = ("ref", "ours") if o.references else ("ours",)
    loop_vs = loop_variants(o.methods, sides)
    variants = loop_vs + (lightning_variants(o.methods) if runner is not None else [])

    counts: Dict[str, Any] = {}
    if o.count:  # what every step does, before any timing: it does not depend on the load
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

    rounds: Dict[str, List[List[Sample]]] = {v: [] for v in variants}
    arithmetic: Dict[str, List[float]] = {v: [] for v in arithmetic_variants(o.methods) if v.split("_")[0] in sides}
    arith_clock = time.process_time if device.type == "cpu" else time.perf_counter
    monitor = LoadMonitor()
    t_start = time.perf_counter()
    for r in range(n_rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            if v.startswith("L_"):
                times = runner.fit(v, steps=n_steps, warmup=o.lightning_warmup)  # type: ignore[union-attr]
            else:
                fn, times = loop.variant(v), []
                for i in range(o.block_warmup + n_steps):
                    loop.synchronize()
                    t0 = Stamp()
                    fn()
                    loop.synchronize()
                    if i >= o.block_warmup:
                        times.append(t0.since())
            rounds[v].append(times)
        for v in arithmetic:
            arithmetic[v] += [loop.time_arithmetic(v, arith_clock) for _ in range(n_steps)]
        monitor.mark_round()
        if o.verbose:
            med = round_medians({v: [rounds[v][-1]] for v in variants}, "cpu")[0]
            print(f"  [{name}] round {r + 1}/{n_rounds} (cpu ms; load {monitor.rounds[-1]['loadavg1']:.2f}): "
                  + ", ".join(f"{k}={1e3 * t:.1f}" for k, t in med.items()), flush=True)
    elapsed = time.perf_counter() - t_start
    system = monitor.finish()
    gc.unfreeze()

    keep = clean_rounds(rounds)
    lightning = runner is not None
    result: Dict[str, Any] = dict(
        model=name, batch=batch_size, seq=seq, params=sum(p.numel() for p in model.parameters()),
        weights=getattr(model, "weights_source", "random init"), rounds=n_rounds, steps=n_steps, seconds=elapsed,
        load=load_report([s for v in rounds for r in rounds[v] for s in r], system),
        X={c: x_table(rounds, o.methods, c, lightning) for c in CLOCKS},
        clean_rounds=keep,
        X_wall_clean=x_table(rounds, o.methods, "wall", lightning, keep=keep) if len(keep) >= 3 else None,
        median_ms={c: median_ms(rounds, c) for c in CLOCKS},
        median_faults=median_faults(rounds),
        arithmetic_ms={v: 1e3 * sorted(ts)[len(ts) // 2] for v, ts in arithmetic.items()},
        counts=counts,
        X_flops={v: x_flops(counts, v, "L_plain" if v.startswith("L_") else "plain")
                 for v in counts if v not in ("fwd_bwd", "plain", "L_plain")} if counts else {},
        saved=saved_state(loop),
        syncs=dict(loop=sync_counts(loop), lightning=runner.sync_counts() if runner is not None else {}),
        cuda_peaks=cuda_peaks(loop, o.peak_steps) if device.type == "cuda" else None,
        steps_raw={v: [[s.as_dict() for s in r] for r in rs] for v, rs in rounds.items()},
    )
    if runner is not None:
        result["phases_ms"] = {c: runner.breakdown(c) for c in CLOCKS}
    return result
