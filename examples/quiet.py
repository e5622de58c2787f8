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


class _OnlyOwnInfo(logging.Filter):
    """Lightning's info lines (the device banner, "`Trainer.fit` stopped") dropped; warnings kept, and the info lines
    that lightning_adv writes through the same logger (its "FGMCallback attacks ..." line: what is attacked)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "lightning_adv" in record.pathname.replace("\\", "/").split("/")


def quiet(banner: bool = True) -> None:
    """Install the filters (idempotent). ``banner=False`` also drops Lightning's own info lines (the device banner),
    keeping lightning_adv's."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
        if not banner and not any(isinstance(f, _OnlyOwnInfo) for f in logger.filters):
            logger.addFilter(_OnlyOwnInfo())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
