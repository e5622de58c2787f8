"""The Lightning layer of lightning_adv: callbacks (automatic optimization) and the mixin (manual)."""

from lightning_adv.callbacks.cli_types import register as _register_cli_types

from lightning_adv.callbacks.awp import AWPCallback
from lightning_adv.callbacks.base import AdversarialCallback
from lightning_adv.callbacks.fgm import FGMCallback
from lightning_adv.callbacks.freelb import FreeLBCallback
from lightning_adv.callbacks.isolation import in_adversarial_pass
from lightning_adv.callbacks.mixin import AdversarialMixin
from lightning_adv.callbacks.neftune import NEFTuneCallback
from lightning_adv.callbacks.pgd import PGDCallback
from lightning_adv.callbacks.r3f import R3FCallback
from lightning_adv.callbacks.rdrop import RDropCallback
from lightning_adv.callbacks.robust import RobustAccuracy
from lightning_adv.callbacks.sam import MomentumSAMCallback, SAMCallback
from lightning_adv.callbacks.smart import SMARTCallback
from lightning_adv.callbacks.text_attack import TextAttackAccuracy
from lightning_adv.callbacks.vat import VATCallback

__all__ = [
    "AWPCallback", "AdversarialCallback", "AdversarialMixin", "FGMCallback", "FreeLBCallback", "PGDCallback",
    "MomentumSAMCallback", "NEFTuneCallback", "R3FCallback", "RDropCallback", "RobustAccuracy", "SAMCallback", "SMARTCallback",
    "TextAttackAccuracy", "VATCallback", "in_adversarial_pass",
]

_register_cli_types()
