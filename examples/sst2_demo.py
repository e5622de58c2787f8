"""The demo: fine-tune the pretrained MiniLM-L6 on the committed SST-2 sample twice, without and with adversarial
training, offline on CPU, and compare them side by side.

    python examples/sst2_demo.py                     # no attack vs FGM
    python examples/sst2_demo.py --method smart      # or fgm, pgd, freelb, awp, r3f
    python examples/sst2_demo.py --data_dir examples/data/sst2 --train_subset 8000  # the full SST-2 (get_sst2.py)

Each model trains for one epoch on the 2,000 training sentences of ``examples/data/sst2_sample/`` (batch 32, AdamW
lr 1e-4, ``SentenceClassifier`` and ``TSVDataModule`` of ``sst2_cli.py``) with a progress bar; then both are tested
on the 300 test sentences with :class:`lightning_adv.RobustAccuracy` (each sentence attacked alone by one
fast-gradient step on its word-embedding output, L2 radius ``--robust_eps``: 0.125 and 0.25 by default, the
medium and strong radii of the benchmark), and a table gives the clean test accuracy, the robust test accuracy and
the time per training step. About 3 to 4 minutes on 2 CPU cores.

300 test sentences and one seed make a demonstration, not a comparison (one sentence is 0.33 points): the
comparison of the methods, over seeds, is ``benchmarks/results/sst2.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from quiet import quiet  # noqa: E402

# method -> (what it is, how to build its callback from the number of training steps)
METHODS: Dict[str, Tuple[str, Callable[[int], Any]]] = {}


def _methods() -> None:
    import lightning_adv as la

    METHODS.update({
        "fgm": ("FGM epsilon=0.3", lambda steps: la.FGMCallback(epsilon=0.3)),
        "pgd": ("PGD epsilon=1 alpha=0.3 steps=3", lambda steps: la.PGDCallback(epsilon=1.0, alpha=0.3, steps=3)),
        "freelb": ("FreeLB adv_lr=0.1 adv_steps=2", lambda steps: la.FreeLBCallback(adv_lr=0.1, adv_steps=2, adv_init_mag=0.6)),
        "awp": ("AWP adv_eps=1e-3 (2nd half)", lambda steps: la.AWPCallback(adv_lr=1.0, adv_eps=1e-3, start_step=steps // 2)),
        "r3f": ("R3F eps=1e-5 lambda=0.5", lambda steps: la.R3FCallback(eps=1e-5, r3f_lambda=0.5)),
        "smart": ("SMART adv_alpha=1", lambda steps: la.SMARTCallback(adv_alpha=1.0)),
    })


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["fgm", "pgd", "freelb", "awp", "r3f", "smart"], default="fgm",
                        help="the adversarial method compared with no attack")
    parser.add_argument("--robust_eps", type=float, nargs="+", default=[0.125, 0.25],
                        help="radii of the evaluation attack (L2, per sentence, on the word-embedding output); the "
                             "default: the medium and strong radii of benchmarks/results/sst2.md")
    parser.add_argument("--data_dir", default=None, help="train.tsv/dev.tsv/test.tsv; default: examples/data/sst2_sample/")
    parser.add_argument("--train_subset", type=int, default=None, help="train on this many training sentences")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train_and_test(args: argparse.Namespace, attack_name: Optional[str]) -> Dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_adv import RobustAccuracy
    from lightning_adv.core.robust import epsilon_key
    from sst2_cli import SentenceClassifier, TSVDataModule

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: List[float] = []

        def on_train_batch_start(self, *_: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *_: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    L.seed_everything(args.seed, verbose=False)
    data = TSVDataModule(data_dir=args.data_dir, train_subset=args.train_subset, batch_size=32, eval_batch_size=64)
    data.setup("fit")
    steps = -(-len(data.splits["train"]) // 32)
    model = SentenceClassifier(lr=1e-4)
    timer = StepTimer()
    robust = RobustAccuracy(epsilon=list(args.robust_eps), validate=False, prog_bar=False)
    callbacks = [timer, robust]
    if attack_name is not None:
        callbacks.append(METHODS[attack_name][1](steps))
    label = METHODS[attack_name][0] if attack_name else "no attack"
    print(f"\n== {label}: 1 epoch, {len(data.splits['train']):,} sentences, {steps} steps", flush=True)
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, precision="32-true")
    trainer.fit(model, datamodule=data)
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    return {
        "label": label,
        "clean": float(metrics["test_acc"]),
        "robust": {e: float(metrics[f"test_robust_acc@{epsilon_key(e)}"]) for e in args.robust_eps},
        "s_per_step": statistics.median(timer.times),
        "n_test": len(data.splits["test"]),
    }


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    quiet(banner=False)  # no device banner; lightning_adv's one line saying what is attacked is kept
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from lightning_adv.core.robust import epsilon_key

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _methods()
    results = [train_and_test(args, None), train_and_test(args, args.method)]
    base = results[0]
    rows = [("clean test accuracy", [f"{100 * r['clean']:.1f}%" for r in results])]
    for e in args.robust_eps:
        rows.append((f"robust test accuracy @{epsilon_key(e)}", [f"{100 * r['robust'][e]:.1f}%" for r in results]))
    rows.append(("time per training step", [f"{r['s_per_step']:.2f} s ({r['s_per_step'] / base['s_per_step']:.1f}x)" for r in results]))
    width = max(len(name) for name, _ in rows)
    cols = [max(len(r["label"]), *(len(row[1][i]) for row in rows)) for i, r in enumerate(results)]
    print(f"\nSST-2 sample, MiniLM-L6, {base['n_test']} test sentences ({time.perf_counter() - start:.0f} s in all):\n")
    print(" " * width + "  " + "  ".join(r["label"].rjust(c) for r, c in zip(results, cols)))
    for name, cells in rows:
        print(name.ljust(width) + "  " + "  ".join(cell.rjust(c) for cell, c in zip(cells, cols)))
    print("\nRobust: each test sentence attacked alone, one fast-gradient step on its embedding output (L2 radius @eps).")
    print("Time per step: the median over the epoch's training steps, under the machine's load at the time.")
    print("One seed on a small sample: a demonstration. Comparison over seeds: benchmarks/results/sst2.md", flush=True)


if __name__ == "__main__":
    main()
