"""RobustAccuracy under DDP: 2 CPU ranks (gloo) validate halves of the data; saves each rank's logged metrics.

Launched by tests/test_robust.py as ``python tests/robust_ddp_script.py OUT_DIR``; Lightning re-runs it for rank 1.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import torch  # noqa: E402

from helpers import end_distributed, trainer  # noqa: E402
from lightning_adv import RobustAccuracy  # noqa: E402
from test_robust import RobustModule, eval_loader, examples, trained  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    robust = RobustAccuracy(epsilon=[0.5, 1.0])
    t = trainer(devices=2, strategy="ddp", callbacks=[robust])
    metrics = t.validate(RobustModule(trained()), eval_loader(examples(40, seed=8)), verbose=False)[0]
    torch.save({k: float(v) for k, v in metrics.items()} | {"batches": robust.batches}, os.path.join(out, f"rank{t.global_rank}.pt"))
    end_distributed()


if __name__ == "__main__":
    main()
