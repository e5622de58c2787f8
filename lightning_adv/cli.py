"""LightningCLI errors that say what was meant: a "did you mean" line for misspelled lightning_adv callbacks and
arguments.

jsonargparse answers ``--trainer.callbacks+=FGMCalback`` with ``Expected a dot import path string: FGMCalback`` and
``--trainer.callbacks.epsilonn=0.5`` with ``Option 'epsilonn' is not accepted``, without a suggestion. Passing
:class:`AdversarialArgumentParser` as LightningCLI's ``parser_class`` (its documented argument; jsonargparse is not
patched) appends one line to such errors::

    from lightning.pytorch.cli import LightningCLI
    from lightning_adv.cli import AdversarialArgumentParser

    LightningCLI(MyModel, MyData, parser_class=AdversarialArgumentParser)

giving, for the two examples, ``did you mean lightning_adv.FGMCallback? ...`` and ``did you mean 'epsilon'?
FGMCallback takes: epsilon, emb_name, start_epoch``. An error that already has a suggestion, or that concerns
nothing of lightning_adv, is left as it is. Needs the ``cli`` extra (``jsonargparse``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from typing import Dict, List, NoReturn, Optional

from lightning.pytorch.cli import LightningArgumentParser

_UNKNOWN_CLASS = (
    re.compile(r"Expected a dot import path string: ([\w.]+)"),
    re.compile(r"Problem with given class_path '([\w.]+)':\s*module '[\w.]+' has no attribute '\w+'"),
    re.compile(r"Import path ([\w.]+) does not"),
)
_UNKNOWN_ARGUMENT = re.compile(r"Problem with given class_path '([\w.]+)':\s*(?:Option|Key) '([^']+)' is not (?:accepted|expected)")
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (--[\w.]+)")


def callback_classes() -> Dict[str, type]:
    """lightning_adv's callbacks by class name (the adversarial callbacks and RobustAccuracy)."""
    import lightning_adv

    return {name: getattr(lightning_adv, name) for name in lightning_adv.callbacks.__all__
            if name.endswith(("Callback", "Accuracy")) and name != "AdversarialCallback"}


def init_arguments(cls: type) -> List[str]:
    """The arguments of ``cls.__init__``, in order."""
    return [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _resolve(path: str) -> Optional[type]:
    module, _, name = path.rpartition(".")
    if not module.startswith("lightning_adv"):
        return None
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) else None


def suggest(message: str, option_strings: Optional[List[str]] = None) -> Optional[str]:
    """The "did you mean" line for a jsonargparse error ``message``, or None when there is nothing to add.

    ``option_strings``: the parser's flags, for ``unrecognized arguments`` (``--robust.epsilonn``).

    >>> suggest("Expected a dot import path string: FGMCalback")
    'did you mean lightning_adv.FGMCallback? (lightning_adv callbacks: AWPCallback, FGMCallback, FreeLBCallback, MomentumSAMCallback, NEFTuneCallback, PGDCallback, R3FCallback, RDropCallback, RobustAccuracy, SAMCallback, SMARTCallback, TextAttackAccuracy, VATCallback)'
    >>> suggest("Problem with given class_path 'lightning_adv.FGMCallback':\\n    Option 'epsilonn' is not accepted")
    "did you mean 'epsilon'? FGMCallback takes: epsilon, emb_name, start_epoch, start_step"
    >>> suggest("Expected a <class 'float'>. Got value: abc") is None
    True
    """
    if "did you mean" in message.lower():
        return None  # jsonargparse suggested already
    lines: List[str] = []
    for path, argument in _UNKNOWN_ARGUMENT.findall(message):
        cls = _resolve(path)
        if cls is None:
            continue
        names = init_arguments(cls)
        close = difflib.get_close_matches(argument, names, n=1)
        head = f"did you mean {close[0]!r}? " if close else f"{argument!r} is not an argument of {cls.__name__}; "
        line = f"{head}{cls.__name__} takes: {', '.join(names)}"
        if line not in lines:
            lines.append(line)
    if not lines:
        classes = callback_classes()
        for pattern in _UNKNOWN_CLASS:
            match = pattern.search(message)
            if match is None:
                continue
            given = match.group(1)
            close = difflib.get_close_matches(given.rpartition(".")[2], list(classes), n=1, cutoff=0.6)
            listed = f"(lightning_adv callbacks: {', '.join(sorted(classes))})"
            if close:
                lines.append(f"did you mean lightning_adv.{close[0]}? {listed}")
            elif given.startswith("lightning_adv"):
                lines.append(f"{given} is not a lightning_adv class {listed}")
            break
    if not lines and option_strings:
        match = _UNRECOGNIZED.search(message)
        if match is not None:
            flag = match.group(1).split("=")[0]
            close = difflib.get_close_matches(flag, option_strings, n=1)
            if close:
                lines.append(f"did you mean {close[0]}?")
    return "\n".join(lines) or None


class AdversarialArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a "did you mean" line for misspelled lightning_adv callbacks and arguments
    (:func:`suggest`); pass it as ``LightningCLI(..., parser_class=AdversarialArgumentParser)``. Everything else is
    Lightning's ``LightningArgumentParser``."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        hint = suggest(message, [s for s in getattr(self, "_option_string_actions", {}) if s.startswith("--")])
        super().error(f"{message.rstrip()}\n{hint}" if hint else message, ex)


__all__ = ["AdversarialArgumentParser", "callback_classes", "init_arguments", "suggest"]
