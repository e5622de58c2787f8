"""lightning_adv: adversarial training (FGM, AWP) for any LightningModule, as a one-line callback.

>>> from lightning_adv import FGMCallback, AWPCallback
>>> callbacks = [FGMCallback(epsilon=1.0), AWPCallback(adv_lr=1.0, adv_eps=0.2)]
"""

from lightning_adv.callbacks import AdversarialCallback, AdversarialMixin, AWPCallback, FGMCallback, RobustAccuracy
from lightning_adv.core import AWP, FGM, GradientStash, ParameterAttack

__version__ = "0.1.0"

__all__ = ["AWP", "AWPCallback", "AdversarialCallback", "AdversarialMixin", "FGM", "FGMCallback", "GradientStash", "ParameterAttack", "RobustAccuracy"]
