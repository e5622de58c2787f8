"""The check that the modules the attacks touch train: transformers 5's ``from_pretrained`` returns a model in eval
mode, and Lightning keeps the modes it finds, so dropout would be off for the whole fit."""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from lightning.pytorch.utilities import rank_zero_warn


def attacked_modules(method: Any) -> List[str]:
    """Dotted paths (in the LightningModule) of the modules whose parameters or output ``method`` perturbs."""
    if hasattr(method, "watched_modules"):  # R-Drop: the dropout modules
        return sorted(set(method.watched_modules()))
    if hasattr(method, "named_params"):
        return sorted({name.rpartition(".")[0] for name, _ in method.named_params})
    target = getattr(method, "target", None)
    return [target.path] if target is not None and getattr(target, "path", None) is not None else []


def warn_eval_mode(pl_module: torch.nn.Module, callbacks: List[Any]) -> List[str]:
    """Warn once when a module that holds what the callbacks attack (the attacked module or a module above it, such
    as a ``transformers`` model loaded with ``from_pretrained``, which returns it in eval mode) is in eval mode:
    Lightning keeps the modes it finds, so dropout would be off for the whole fit. Returns the modules named."""
    found: Dict[str, List[str]] = {}
    for cb in callbacks:
        for path in attacked_modules(cb.method):
            parts = path.split(".") if path else []
            for depth in range(len(parts) + 1):  # the LightningModule, then each module down to the attacked one
                prefix = ".".join(parts[:depth])
                try:
                    module = pl_module.get_submodule(prefix)
                except AttributeError:
                    break
                if not module.training:
                    found.setdefault(prefix, []).append(type(cb).__name__)
                    break  # the highest module in eval mode says it
    if not found:
        return []
    named = []
    for prefix, owners in found.items():
        module = pl_module.get_submodule(prefix)
        what = f"self.{prefix}" if prefix else "the LightningModule"
        named.append(f"{what} ({type(module).__name__}, attacked by {', '.join(sorted(set(owners)))})")
    all_owners = {o for owners in found.values() for o in owners}
    rdrop = sorted(type(cb).__name__ for cb in callbacks if hasattr(cb.method, "watched_modules")
                   and type(cb).__name__ in all_owners)
    extra = (f" {', '.join(rdrop)} then draws the same output twice (one dropout mask): its KL is 0 and it only doubles "
             "the cost." if rdrop else "")
    fix = " and ".join(f"`self.{p}.train()`" if p else "`self.train()`" for p in found)
    rank_zero_warn(
        f"lightning_adv: {'; '.join(named)} {'is' if len(found) == 1 else 'are'} in eval mode at the start of training, "
        "so dropout is off for the whole fit (Lightning keeps the modes it finds, and transformers' from_pretrained "
        f"returns the model in eval mode): the attacks and the training see a model without dropout. Call {fix} after "
        "loading the model (in __init__) or in the LightningModule's on_fit_start." + extra,
        category=UserWarning,
    )
    return list(found)


__all__ = ["attacked_modules", "warn_eval_mode"]
