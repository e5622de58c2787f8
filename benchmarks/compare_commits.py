#!/usr/bin/env python
"""Is a change of X load or a regression? The same step at several commits of ``lightning_adv``, side by side.

Each commit's ``lightning_adv`` is extracted (``git archive``) into a temporary directory and imported by a worker
process of its own, which builds the same model and batch with ``benchmarks/cost`` (this checkout's library: the
public API only, so it runs against any commit that has it). Then:

* ``--count`` (load-free): every worker counts one step of each variant (``cost.opcount``: model forwards, backward
  traversals, matrix-multiply FLOPs, ATen operators and the bytes they write, ``_foreach_*`` calls, copies, Python
  calls in ``lightning_adv``); any difference between commits is listed down to the operator. The same counts mean
  the same work: a change of the timed X is then load (or Python overhead, which ``py_calls`` bounds);
* ``--rounds N`` (timed): the workers take turns, one round each in a rotated order, N times; only one runs at a
  time, on one thread, so load drifts hit every commit alike. X per commit and the paired difference to the first
  commit come with their spread (``cost.stats``), and the load verdict of the whole comparison (``cost.clocks``).

Usage::

    python benchmarks/compare_commits.py --commits 85807e7,HEAD --count                     # seconds, load-free
    python benchmarks/compare_commits.py --commits 85807e7,HEAD --rounds 9 --methods freelb,pgd   # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIELDS = ("forwards", "backwards", "weight_backwards", "flops", "ops", "bytes", "foreach", "copies", "py_calls")


# -- the worker: one commit's lightning_adv ----------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    sys.path[:0] = [args.worker, HERE]  # the commit's lightning_adv first, then benchmarks/ (cost, the snippets)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lightning_adv
    import torch

    from cost.clocks import Stamp, one_thread
    from cost.config import MODELS
    from cost.lightning_runner import LightningRunner
    from cost.loop import Loop
    from cost.models import build_model, make_batch, quiet
    from cost.opcount import count_step

    assert os.path.abspath(lightning_adv.__file__).startswith(os.path.abspath(args.worker)), lightning_adv.__file__
    quiet()
    one_thread(args.threads)
    methods = args.methods.split(",")
    model = build_model(args.model)
    spec = MODELS[args.model]
    batch = make_batch(model, spec["batch"], spec["seq"])
    device = torch.device("cpu")
    loop = Loop(model, batch, device, "fp32", methods, references=False)
    runner = None if args.no_lightning else LightningRunner(model, batch, device, "fp32", methods)
    variants = ["fwd_bwd", "plain"] + [f"ours_{m}" for m in methods]
    variants += [] if runner is None else ["L_plain"] + [f"L_{m}" for m in methods]

    def reply(obj: Any) -> None:
        print("@@ " + json.dumps(obj), flush=True)

    reply(dict(ready=lightning_adv.__file__))
    warm = False
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "count":
            counts = {v: (runner.count(v) if v.startswith("L_") else count_step(model, loop.variant(v))) for v in variants}
            loop.opt.zero_grad(set_to_none=True)
            reply(counts)
        elif cmd[0] == "round":
            r, steps = int(cmd[1]), int(cmd[2])
            if not warm:  # the first round of each worker: every variant once, untimed
                for v in variants:
                    runner.fit(v, 1, 1) if v.startswith("L_") else loop.variant(v)()
                warm = True
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            out: Dict[str, List[Dict[str, Any]]] = {}
            for v in order:
                if v.startswith("L_"):
                    times = runner.fit(v, steps=steps, warmup=1)  # type: ignore[union-attr]
                else:
                    fn, times = loop.variant(v), []
                    for i in range(1 + steps):
                        t0 = Stamp()
                        fn()
                        if i:
                            times.append(t0.since())
                out[v] = [s.as_dict() for s in times]
            reply(out)


# -- the parent ------------------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, label: str, path: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--model", args.model, "--methods",
               args.methods, "--threads", str(args.threads)] + (["--no-lightning"] if args.no_lightning else [])
        env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.label = label
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.ready = self.ask(None)["ready"]

    def ask(self, command: Optional[str]) -> Any:
        if command is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"worker {self.label} ended (exit {self.proc.wait()})")

    def close(self) -> None:
        try:
            self.ask("quit") if self.proc.poll() is None else None
        except (RuntimeError, BrokenPipeError):
            pass
        self.proc.wait(timeout=60)


def extract(commit: str, into: str) -> str:
    """``lightning_adv`` of ``commit`` under ``into/<sha>``; ``WORKTREE``: this checkout as it is; a directory
    holding a ``lightning_adv`` package (e.g. extracted beforehand, for a machine without the git history): itself."""
    if commit == "WORKTREE":
        return ROOT
    if os.path.isdir(os.path.join(commit, "lightning_adv")):
        return os.path.abspath(commit)
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", commit], capture_output=True, text=True,
                         check=True).stdout.strip()
    path = os.path.join(into, sha)
    os.makedirs(path, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", sha, "lightning_adv"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    return path


def compare_counts(counts: Dict[str, Dict[str, Any]]) -> List[str]:
    labels = list(counts)
    first = labels[0]
    lines = ["| variant | field | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    differences: List[str] = []
    for v in counts[first]:
        for f in FIELDS:
            values = [counts[c][v][f] for c in labels]
            lines.append(f"| {v} | {f} | " + " | ".join(str(x) for x in values) + " |")
        for c in labels[1:]:
            a, b = counts[first][v]["per_op"], counts[c][v]["per_op"]
            for op in sorted(set(a) | set(b)):
                if a.get(op) != b.get(op):
                    differences.append(f"{v}: `{op}` {first} {a.get(op, [0, 0])} → {c} {b.get(op, [0, 0])} (calls, bytes)")
    lines += ["", "Operators whose calls or bytes differ from the first commit (calls, bytes):", ""]
    lines += [f"* {d}" for d in differences] or ["* none: every variant calls the same ATen operators, as often, writing the same bytes"]
    return lines


def compare_times(rounds: Dict[str, List[Dict[str, List[Dict[str, Any]]]]], methods: Sequence[str],
                  lightning: bool) -> List[str]:
    from cost.clocks import Sample
    from cost.stats import spread

    labels = list(rounds)
    lines = []
    for clock in ("cpu", "wall"):
        lines += ["", f"X by {clock} time, median over rounds [90% bootstrap interval]; Δ: paired by round, minus "
                  f"{labels[0]}:", ""]
        head = ["path", "method"] + labels + [f"Δ {c}" for c in labels[1:]]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for path, plain in (("loop", "plain"), ("Lightning", "L_plain")) if lightning else (("loop", "plain"),):
            for m in methods:
                variant = f"ours_{m}" if path == "loop" else f"L_{m}"
                xs: Dict[str, List[float]] = {}
                for c in labels:
                    xs[c] = []
                    for rnd in rounds[c]:
                        med = {v: sorted(Sample(**s).get(clock) for s in rnd[v])[len(rnd[v]) // 2] for v in rnd}
                        xs[c].append((med[variant] - med[plain]) / med["fwd_bwd"])
                cells = [spread(xs[c]) for c in labels] + [spread([b - a for a, b in zip(xs[labels[0]], xs[c])])
                                                            for c in labels[1:]]
                lines.append(f"| {path} | {m} | " + " | ".join(
                    f"{d['value']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if i >= len(labels) else
                    f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]" for i, d in enumerate(cells)) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commits", default="85807e7,HEAD", help="comma-separated commits (WORKTREE: this checkout)")
    p.add_argument("--model", default="small")
    p.add_argument("--methods", default="freelb,pgd")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--count", action="store_true", help="the load-free counts")
    p.add_argument("--rounds", type=int, default=0, help="interleaved timed rounds (0: none)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--no-lightning", action="store_true")
    p.add_argument("--out", default=None, help="write the Markdown here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, HERE)
    from cost.clocks import LoadMonitor, Sample, load_report

    methods = args.methods.split(",")
    results: Dict[str, Any] = dict(args=vars(args))
    lines = [f"# `{' '.join(['python benchmarks/compare_commits.py'] + list(argv if argv is not None else sys.argv[1:]))}`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        workers = [Worker(os.path.basename(c.rstrip("/")), extract(c, tmp), args) for c in args.commits.split(",")]
        try:
            if args.count:
                counts = {w.label: w.ask("count") for w in workers}
                results["counts"] = counts
                lines += [f"Load-free counts of one step, model `{args.model}`:", ""] + compare_counts(counts)
            if args.rounds:
                monitor = LoadMonitor()
                rounds: Dict[str, List[Any]] = {w.label: [] for w in workers}
                for r in range(args.rounds):
                    for w in workers[r % len(workers):] + workers[: r % len(workers)]:
                        rounds[w.label].append(w.ask(f"round {r} {args.steps}"))
                    monitor.mark_round()
                    print(f"round {r + 1}/{args.rounds} done (load {monitor.rounds[-1]['loadavg1']:.2f})", file=sys.stderr)
                samples = [Sample(**s) for c in rounds for rnd in rounds[c] for steps in rnd.values() for s in steps]
                load = load_report(samples, monitor.finish())
                results["rounds"], results["load"] = rounds, load
                lines += ["", f"Interleaved timing, model `{args.model}`, {args.rounds} rounds × {args.steps} timed steps, "
                          f"{args.threads} thread(s); load: **{load['verdict']}** ({'; '.join(load['reasons']) or 'no sign of load'}; load "
                          f"average {load['loadavg_before'][0]:.2f} → {load['loadavg_after'][0]:.2f}, others "
                          f"{load.get('others_cores', float('nan')):.2f} cores, waited {100 * load['wait_fraction']:.1f}%)."]
                lines += compare_times(rounds, methods, not args.no_lightning)
        finally:
            for w in workers:
                w.close()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
