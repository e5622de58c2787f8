"""Run by tests/test_cuda.py on a GPU (FSDP initialises a process group): every callback refuses Lightning's real
FSDPStrategy at setup with its message. Writes ``{callback: message}`` as JSON to argv[1]."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Dict

from helpers import LogitsText, loader, make_data, trainer
from lightning.pytorch.strategies import FSDPStrategy

from lightning_adv import AWPCallback, FGMCallback, FreeLBCallback, PGDCallback, R3FCallback, SMARTCallback

warnings.filterwarnings("ignore")


def main(path: str) -> None:
    refused: Dict[str, str] = {}
    for make in (FGMCallback, AWPCallback, PGDCallback, FreeLBCallback, R3FCallback, SMARTCallback):
        try:
            trainer(accelerator="cuda", devices=1, deterministic=False, strategy=FSDPStrategy(), max_steps=1,
                    callbacks=[make()]).fit(LogitsText(), loader(make_data(8)))
            refused[make.__name__] = "ran"
        except ValueError as err:
            refused[make.__name__] = str(err)
    with open(path, "w") as f:
        json.dump(refused, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
