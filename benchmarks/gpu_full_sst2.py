"""SST-2 at full size on one GPU (issue 22, point 2b): every method at its selected setting, 3 seeds, side by side.

Protocol: the CPU benchmark's (``benchmarks/sst2_benchmark.py``: MiniLM-L6, batch 32, AdamW lr 1e-4, 10% warm-up,
fp32, the same evaluation radii 0.05 / 0.125 / 0.25) but on **all 67,349 training sentences for 2 epochs**, each
method at the setting selected on the CPU benchmark's seed 0 (read from ``benchmarks/results/sst2_runs/``; AWP's
``start_step`` is half of the run's steps), seeds 0, 1, 2; DeepWordBug on **all 1,821 test sentences**. Every run
is one ``sst2_benchmark.py --run`` process; its checkpoint goes to ``--ckpt_dir`` and its JSON to ``--runs_dir``
(finished runs are skipped, so the script resumes).

1. **Probe** (about a minute and a half): ``--probe_levels`` concurrency levels in turn (1, 2, 4, 8), each ``k``
   processes training the costliest method (PGD) for ``--probe_seconds`` after a warm-up; their summed steps/s and
   peak GPU memory. The concurrency is the smallest level within 10% of the best throughput whose memory fits in
   80% of the GPU, at most ``--max_concurrency`` (default: half the CPU cores); each process gets
   ``cores // concurrency`` torch threads.
2. **Runs**: the queue, costliest methods first, ``concurrency`` processes at a time; none is started after
   ``--deadline_min`` (the rest stay pending for the next call). The probe prints a rough projection of the
   training time. Sizing from the H200 cost table (``attack_cost_cuda.md``: a MiniLM Lightning step is
   host-bound, about 25 ms): the 21 runs of 4,210 steps are about 110 process-minutes of training, so even at
   5-6x from concurrency they need more than one 15-minute device session: run it with ``--deadline_min`` (e.g.
   8) and call it again in the next session (finished runs are kept), or start with ``--seeds 0``.
3. **Report**: ``<runs_dir>/summary.json`` and ``benchmarks/results/sst2_full_gpu.md`` (the "full size, GPU"
   table: clean, embedding-space robust and DeepWordBug accuracy per method, mean ± std over seeds; the probe; the
   machine), then ``sst2_benchmark.py --report_only``, whose ``sst2.md`` includes that table.

    python benchmarks/gpu_full_sst2.py                                  # on the GPU machine (resumable)
    python benchmarks/gpu_full_sst2.py --report_only                    # the tables from the runs done so far
    python benchmarks/gpu_full_sst2.py --tiny --out /tmp/tiny           # CPU check of the whole pipeline (a minute)

``--tiny`` runs the same code on the CPU with a tiny configuration (the committed SST-2 sample, 2 training steps,
one evaluation batch, 4 sentences attacked, probe levels 1 and 2 of 1 s with FGM, methods none and FGM, seed 0) into
``--out``; ``tests/test_gpu_full_sst2.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCH = os.path.join(HERE, "sst2_benchmark.py")
sys.path.insert(0, HERE)

METHODS = ("none", "fgm", "r3f", "awp", "smart", "freelb", "pgd")
COST_ORDER = ("pgd", "freelb", "smart", "r3f", "fgm", "awp", "none")  # costliest first: better packing
DEFAULT_SETTINGS = {  # the CPU benchmark's selection (benchmarks/results/sst2.md), if its runs cannot be read
    "none": {}, "fgm": {"epsilon": 0.3}, "r3f": {"eps": 1e-5, "r3f_lambda": 0.5}, "awp": {"adv_lr": 1.0, "adv_eps": 1e-3},
    "smart": {"adv_alpha": 1.0}, "freelb": {"adv_lr": 0.1, "adv_steps": 2, "adv_init_mag": 0.6, "adv_max_norm": 0.0},
    "pgd": {"epsilon": 1.0, "alpha": 0.3, "steps": 3},
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2"))
    p.add_argument("--runs_dir", default=os.path.join(ROOT, "benchmarks", "results", "sst2_full_runs"))
    p.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--ckpt_dir", default=os.path.join(ROOT, "runs", "sst2_full_checkpoints"))
    p.add_argument("--cpu_runs_dir", default=os.path.join(ROOT, "benchmarks", "results", "sst2_runs"),
                   help="the CPU benchmark's runs, whose seed-0 search selects each method's setting")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train_subset", type=int, default=0, help="0: all training sentences")
    p.add_argument("--text_attack_n", type=int, default=1821, help="test sentences attacked with DeepWordBug")
    p.add_argument("--text_attack_batch", type=int, default=256)
    p.add_argument("--robust_eps", type=float, nargs=3, default=[0.05, 0.125, 0.25])
    p.add_argument("--accelerator", default="cuda")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--probe_levels", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--probe_seconds", type=float, default=10.0)
    p.add_argument("--probe_method", default="pgd", choices=METHODS)
    p.add_argument("--probe_subset", type=int, default=4000, help="training sentences tokenized by a probe process")
    p.add_argument("--probe_warmup", type=int, default=3, help="steps of each probe process not timed")
    p.add_argument("--max_concurrency", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--concurrency", type=int, default=None, help="skip the probe and run this many processes")
    p.add_argument("--deadline_min", type=float, default=None, help="start no run after this many minutes")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--no_main_report", action="store_true", help="do not regenerate benchmarks/results/sst2.md")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="passed to every sst2_benchmark.py process")
    p.add_argument("--tiny", action="store_true", help="CPU check with a tiny configuration (see the docstring)")
    p.add_argument("--out", default=None, help="--tiny: the folder for everything it writes")
    args = p.parse_args(argv)
    if args.tiny:
        out = args.out or os.path.join("/tmp", "gpu_full_sst2_tiny")
        args.data_dir = os.path.join(ROOT, "examples", "data", "sst2_sample")
        args.runs_dir, args.results_dir, args.ckpt_dir = (os.path.join(out, d) for d in ("runs", "results", "ckpt"))
        args.methods, args.seeds, args.epochs, args.train_subset = ["none", "fgm"], [0], 1, 64
        args.text_attack_n, args.text_attack_batch, args.accelerator = 4, 64, "cpu"
        args.probe_levels, args.probe_seconds, args.probe_subset, args.max_concurrency = [1, 2], 1.0, 64, 2
        args.probe_method, args.probe_warmup = "fgm", 1
        args.no_main_report = True
        args.extra = ["--limit_train_batches", "2", "--limit_eval_batches", "1"] + list(args.extra)
    return args


# -- settings -----------------------------------------------------------------------------------------------------


def selected_settings(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Each method's setting selected on the CPU benchmark's seed 0 (its ``select``), else :data:`DEFAULT_SETTINGS`."""
    import sst2_benchmark as bench

    chosen = dict(DEFAULT_SETTINGS)
    if os.path.isdir(args.cpu_runs_dir):
        runs = []
        for name in sorted(os.listdir(args.cpu_runs_dir)):
            if name.endswith(".json") and name not in ("epsilons.json", "measure.json"):
                with open(os.path.join(args.cpu_runs_dir, name)) as f:
                    runs.append(json.load(f))
        for m in METHODS:
            seed0 = [r for r in runs if r.get("method") == m and r.get("seed") == 0 and r.get("protocol")]
            if seed0:
                params = dict(bench.select(seed0)["params"])
                params.pop("start_step", None)  # recomputed for the run's own length
                chosen[m] = params
    return chosen


def common_flags(args: argparse.Namespace, threads: int) -> List[str]:
    return [
        "--data_dir", args.data_dir, "--runs_dir", args.runs_dir, "--results_dir", args.results_dir,
        "--ckpt_dir", args.ckpt_dir, "--epochs", str(args.epochs), "--train_subset", str(args.train_subset),
        "--robust_eps", *map(str, args.robust_eps), "--text_attack_n", str(args.text_attack_n),
        "--text_attack_batch", str(args.text_attack_batch), "--accelerator", args.accelerator,
        "--precision", args.precision, "--threads", str(threads),
    ] + list(args.extra)


def run_params(args: argparse.Namespace, method: str, params: Dict[str, float]) -> Dict[str, float]:
    """AWP starts at half of the run's optimizer steps, as in the CPU protocol."""
    if method != "awp":
        return dict(params)
    import sst2_benchmark as bench

    ns = bench.parse_args(["--data_dir", args.data_dir, "--train_subset", str(args.train_subset), "--epochs", str(args.epochs)]
                          + [a for a in args.extra])
    return dict(params, start_step=(bench.steps_per_epoch(ns) * args.epochs) // 2)


# -- processes ----------------------------------------------------------------------------------------------------


def launch(args: argparse.Namespace, flags: List[str], log: str) -> subprocess.Popen:
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        return subprocess.Popen([args.python, BENCH] + flags, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def probe(args: argparse.Namespace) -> Dict[str, Any]:
    """Throughput and peak memory at each concurrency level; the level chosen."""
    cores = os.cpu_count() or 1
    levels = [k for k in args.probe_levels if k <= args.max_concurrency] or [1]
    rows = []
    t_all = time.perf_counter()
    for k in levels:
        threads = max(1, cores // k)
        flags = common_flags(args, threads) + ["--probe", str(args.probe_seconds), "--run", args.probe_method,
                                                "--train_subset", str(args.probe_subset), "--probe_warmup", str(args.probe_warmup)]
        logs = [os.path.join(args.runs_dir, "logs", f"probe_{k}_{i}.log") for i in range(k)]
        t0 = time.perf_counter()
        procs = [launch(args, flags + ["--seed", str(i)], log) for i, log in enumerate(logs)]
        codes = [p.wait() for p in procs]
        outs = []
        for log, code in zip(logs, codes):
            line = [x for x in open(log).read().splitlines() if x.startswith("PROBE ")]
            if code != 0 or not line:
                raise RuntimeError(f"probe process failed (exit {code}); see {log}")
            outs.append(json.loads(line[-1][len("PROBE "):]))
        rows.append({"concurrency": k, "threads": threads, "steps_per_s": sum(o["steps_per_s"] for o in outs),
                     "s_per_step": statistics.median(o["s_per_step"] for o in outs),
                     "max_memory_gb": max(o["max_memory_gb"] for o in outs), "wall_s": time.perf_counter() - t0})
        print(f"[probe] {k} process(es) x {threads} threads: {rows[-1]['steps_per_s']:.1f} steps/s in all, "
              f"{rows[-1]['s_per_step'] * 1000:.0f} ms/step each, {rows[-1]['max_memory_gb']:.2f} GiB peak each", flush=True)
    total_gb = gpu_memory_gb()
    fits = [r for r in rows if not total_gb or r["concurrency"] * r["max_memory_gb"] <= 0.8 * total_gb] or rows[:1]
    best = max(r["steps_per_s"] for r in fits)
    chosen = min((r for r in fits if r["steps_per_s"] >= 0.9 * best), key=lambda r: r["concurrency"])
    info = {"levels": rows, "chosen": chosen["concurrency"], "threads": chosen["threads"], "method": args.probe_method,
            "seconds": args.probe_seconds, "gpu_memory_gb": total_gb, "wall_s": time.perf_counter() - t_all}
    print(f"[probe] concurrency {info['chosen']} ({info['threads']} threads each), probe took {info['wall_s']:.0f} s", flush=True)
    return info


def gpu_memory_gb() -> float:
    try:
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    except Exception:  # pragma: no cover - no torch / no GPU
        return 0.0


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    except Exception:  # pragma: no cover
        return "unknown"


def run_all(args: argparse.Namespace, concurrency: int, threads: int) -> Dict[str, Any]:
    """Every (method, seed), costliest first, ``concurrency`` processes at a time."""
    import sst2_benchmark as bench

    settings = selected_settings(args)
    queue: List[Tuple[str, Dict[str, float], int]] = []
    for m in COST_ORDER:
        if m in args.methods:
            for s in args.seeds:
                queue.append((m, run_params(args, m, settings[m]), s))
    todo = [q for q in queue if not os.path.exists(os.path.join(args.runs_dir, bench.run_name(q[0], q[1], q[2]) + ".json"))]
    print(f"[runs] {len(queue)} runs planned, {len(queue) - len(todo)} done already, {concurrency} at a time", flush=True)
    t0 = time.perf_counter()
    running: Dict[str, Tuple[subprocess.Popen, float]] = {}
    failed: List[str] = []
    finished: Dict[str, float] = {}
    while todo or running:
        late = args.deadline_min is not None and time.perf_counter() - t0 > 60 * args.deadline_min
        while todo and len(running) < concurrency and not late:
            m, params, s = todo.pop(0)
            name = bench.run_name(m, params, s)
            flags = common_flags(args, threads) + ["--run", m, "--params", json.dumps(params), "--seed", str(s), "--no_report"]
            running[name] = (launch(args, flags, os.path.join(args.runs_dir, "logs", name + ".log")), time.perf_counter())
            print(f"[runs] started {name} ({len(running)} running)", flush=True)
        if late and todo:
            print(f"[runs] deadline reached: {len(todo)} runs left pending", flush=True)
            todo = []
        time.sleep(0.5)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                finished[name] = time.perf_counter() - started
                if proc.returncode != 0:
                    failed.append(name)
                print(f"[runs] {name} {'finished' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} in "
                      f"{finished[name] / 60:.1f} min", flush=True)
    return {"planned": [bench.run_name(*q) for q in queue], "failed": failed, "wall_s": time.perf_counter() - t0,
            "run_wall_s": finished, "settings": settings}


# -- report -------------------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, probe_info: Optional[Dict[str, Any]], run_info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    import sst2_benchmark as bench

    summary_path = os.path.join(args.runs_dir, "summary.json")
    old = bench.read_json(summary_path) or {}
    probe_info = probe_info or old.get("probe")
    run_info = run_info or old.get("runs")
    runs = []
    if os.path.isdir(args.runs_dir):
        for name in sorted(os.listdir(args.runs_dir)):
            if name.endswith(".json") and name != "summary.json":
                runs.append(bench.read_json(os.path.join(args.runs_dir, name)))
    keys = [bench.epsilon_key(e) for e in args.robust_eps]
    cols = [("dev_clean_acc", "dev acc"), ("test_clean_acc", "test acc")] + [(f"test_robust_acc@{k}", f"test robust @{k}") for k in keys]
    head = ("| method | setting | seeds | " + " | ".join(c for _, c in cols) + " | DeepWordBug: clean acc | acc under attack | "
            "success rate | queries | words perturbed (%) | s/step |")
    L_ = [
        "## Full size, GPU",
        "",
        f"All {'67,349' if not args.train_subset else f'{args.train_subset:,}'} training sentences, {args.epochs} epochs "
        f"({'all 1,821' if args.text_attack_n >= 1821 else args.text_attack_n} test sentences attacked with DeepWordBug), "
        "every method at the setting selected on the CPU benchmark's seed 0, by `benchmarks/gpu_full_sst2.py`; otherwise "
        "the protocol above (MiniLM-L6, batch 32, AdamW lr 1e-4, fp32, the same radii). Mean ± std over seeds, in %.",
        "",
        head,
        "| --- | --- | --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in METHODS:
        rs = [r for r in runs if r and r.get("method") == m]
        if m not in args.methods:
            continue
        if not rs:
            L_.append(f"| {bench.LABELS[m]} | – | pending | " + " | ".join("" for _ in cols) + " | | | | | | |")
            continue
        cells = [bench.pm([r[k] for r in rs]) for k, _ in cols]
        text = bench.text_attack_cells(rs)
        step = f"{statistics.median(r['s_per_step'] for r in rs):.3f}"
        L_.append(f"| {bench.LABELS[m]} | {bench.params_text(rs[0]['params'])} | {', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
                  + " | ".join(cells) + " | " + " | ".join(text) + f" | {step} |")
    L_.append("")
    if probe_info:
        L_.append("Concurrency probe (" + f"{probe_info['method']}, {probe_info['seconds']:g} s per level): "
                  + "; ".join(f"{r['concurrency']} process(es): {r['steps_per_s']:.1f} steps/s, {r['max_memory_gb']:.2f} GiB each"
                              for r in probe_info["levels"])
                  + f". Chosen: {probe_info['chosen']} processes × {probe_info['threads']} threads"
                  + (f"; projected training ≈ {probe_info['projected_training_min']:.0f} min." if "projected_training_min" in probe_info else "."))
    if run_info:
        done = {r["name"] for r in runs if r}
        pending = [n for n in run_info["planned"] if n not in done]
        L_.append(f"Runs: {len(done)} of {len(run_info['planned'])} done" + (f", pending: {', '.join(pending)}" if pending else "")
                  + (f"; failed: {', '.join(run_info['failed'])}" if run_info.get("failed") else "")
                  + f"; wall time of this call {run_info['wall_s'] / 60:.1f} min.")
    hw = next((r["hardware"] for r in runs if r), "")
    L_ += [f"Machine: {gpu_name()}; {hw}.", ""]
    info = {"markdown": L_, "probe": probe_info, "runs": run_info, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node()}
    bench.write_json(summary_path, info)
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "sst2_full_gpu.md"), "w") as f:
        f.write("# SST-2 at full size on a GPU\n\n" + "\n".join(L_[2:]) + "\n")
    print("\n".join(L_), flush=True)
    if not args.no_main_report:
        subprocess.run([args.python, BENCH, "--report_only", "--results_dir", args.results_dir], cwd=ROOT, check=False)
    return info


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.runs_dir, exist_ok=True)
    if args.report_only:
        return report(args, None, None)
    if args.concurrency:
        probe_info = None
        concurrency, threads = args.concurrency, max(1, (os.cpu_count() or 1) // args.concurrency)
    else:
        probe_info = probe(args)
        concurrency, threads = probe_info["chosen"], probe_info["threads"]
    if probe_info:
        projection(args, probe_info)
    run_info = run_all(args, concurrency, threads)
    return report(args, probe_info, run_info)


def projection(args: argparse.Namespace, probe_info: Dict[str, Any]) -> float:
    """Rough wall time of the runs: the probe's step time of its method at the chosen concurrency, scaled to each
    method by the CPU benchmark's relative step costs (``measure.json``), over the planned steps, divided by the
    concurrency (evaluations not included). Printed, so that a session can size ``--deadline_min``."""
    import sst2_benchmark as bench

    meas = bench.read_json(os.path.join(args.cpu_runs_dir, "measure.json")) or {}
    rel = meas.get("relative", {})
    level = next(r for r in probe_info["levels"] if r["concurrency"] == probe_info["chosen"])
    base = level["s_per_step"] / rel.get(probe_info["method"], 1.0)
    ns = bench.parse_args(["--data_dir", args.data_dir, "--train_subset", str(args.train_subset), "--epochs", str(args.epochs)]
                          + list(args.extra))
    steps = bench.steps_per_epoch(ns) * args.epochs
    per_run = {m: steps * base * (((1 + rel.get("awp", 1.0)) / 2) if m == "awp" else rel.get(m, 1.0)) for m in args.methods}
    total = sum(per_run[m] for m in args.methods) * len(args.seeds) / probe_info["chosen"]
    print(f"[plan] {len(args.methods) * len(args.seeds)} runs of {steps} steps: about {total / 60:.0f} min of training at "
          f"concurrency {probe_info['chosen']} (rough: {base * 1000:.0f} ms per plain step scaled by the CPU relative costs; "
          "evaluations not included)", flush=True)
    probe_info["projected_training_min"] = total / 60
    return total


if __name__ == "__main__":
    main()
