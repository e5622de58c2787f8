"""lightning_adv: adversarial training (FGM, PGD, FreeLB, AWP, SMART, R3F, R-Drop, VAT) for any LightningModule, in one callback.

>>> from lightning_adv import FGMCallback, AWPCallback
>>> callbacks = [FGMCallback(epsilon=1.0), AWPCallback(adv_lr=1.0, adv_eps=0.2)]
"""

from lightning_adv.callbacks import (
    AdversarialCallback, AdversarialMixin, AWPCallback, FGMCallback, FreeLBCallback, MomentumSAMCallback, NEFTuneCallback,
    PGDCallback, R3FCallback, RDropCallback, RobustAccuracy, SAMCallback, SMARTCallback, TextAttackAccuracy, VATCallback, in_adversarial_pass,
)
from lightning_adv.core import (
    AWP, FGM, PGD, R3F, SAM, RDrop, SMART, VAT, FreeLB, GradientStash, Method, MomentumSAM, NEFTune, adversarial_backward,
    deepwordbug_attack,
)
from lightning_adv.fabric import adversarial_backward as fabric_adversarial_backward  # Lightning Fabric loops

__version__ = "0.2.0"

__all__ = [
    "AWP", "AWPCallback", "AdversarialCallback", "AdversarialMixin", "FGM", "FGMCallback", "FreeLB", "FreeLBCallback",
    "GradientStash", "Method", "MomentumSAM", "MomentumSAMCallback", "NEFTune", "NEFTuneCallback", "PGD", "PGDCallback",
    "R3F", "R3FCallback", "RDrop", "RDropCallback", "RobustAccuracy", "SAM", "SAMCallback", "SMART", "SMARTCallback", "TextAttackAccuracy", "VAT", "VATCallback",
    "adversarial_backward", "deepwordbug_attack", "fabric_adversarial_backward", "in_adversarial_pass",
]
