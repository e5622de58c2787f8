"""The demo: fine-tune the pretrained MiniLM-L6 on the committed SST-2 sample with FGM, offline, on CPU.

    python examples/sst2_demo.py                    # FGM (examples/configs/fgm.yaml)
    python examples/sst2_demo.py --method awp       # or none / awp
    python examples/sst2_demo.py --method none --data.data_dir ../shared/data/sst2/ --data.train_subset 10000

It runs ``examples/sst2_cli.py fit --config examples/configs/<method>.yaml`` (any further flag goes to that CLI):
one epoch on 2,000 training sentences with a progress bar, validation accuracy and accuracy under attack on the 200
dev sentences, a checkpoint of the best epoch, then a test of that checkpoint on the 300 test sentences. It ends
with one line giving the clean and the robust test accuracy (robust: the word embeddings perturbed by FGM with
epsilon 1 at evaluation, ``lightning_adv.callbacks.robust.RobustAccuracy``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["none", "fgm", "awp"], default="fgm", help="attack used in training")
    args, extra = parser.parse_known_args()
    start = time.perf_counter()
    import sst2_cli  # imports torch, lightning and transformers: counted in the wall time

    cli = sst2_cli.cli_main(
        args=[
            "fit",
            "--config", os.path.join(HERE, "configs", f"{args.method}.yaml"),
            f"--trainer.default_root_dir=runs/sst2_demo/{args.method}",
            *extra,
        ]
    )
    elapsed = time.perf_counter() - start
    metrics = getattr(cli, "last_test_metrics", {})
    val = getattr(cli, "last_val_metrics", {})
    if cli.trainer.is_global_zero and metrics:
        print(
            f"DEMO ({args.method}, {elapsed / 60:.1f} min): dev accuracy {100 * val.get('val_acc', float('nan')):.1f}% "
            f"(robust {100 * val.get('val_robust_acc', float('nan')):.1f}%), test accuracy {100 * float(metrics['test_acc']):.1f}% "
            f"(robust {100 * float(metrics['test_robust_acc']):.1f}%)",
            flush=True,
        )


if __name__ == "__main__":
    main()
