"""Keep the examples' output to the progress bar and the results: drop Lightning's advertising tips and the
deprecation warnings of its dependencies (nothing that concerns the run)."""

from __future__ import annotations

import logging
import warnings

_NOISE = ("Tip:", "litlogger", "tensorboardX", "LitLogger")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(word in message for word in _NOISE)


def quiet() -> None:
    """Install the filters (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
