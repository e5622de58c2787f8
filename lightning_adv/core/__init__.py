"""Pure-PyTorch core of lightning_adv: perturb, backpropagate, restore. No Lightning import.

Usable in a hand-written loop::

    loss = loss_fn(); loss.backward()
    fgm.attack_backward(loss_fn)      # or awp.attack_backward(loss_fn)
    optimizer.step(); optimizer.zero_grad()
"""

from lightning_adv.core.attack import ParameterAttack
from lightning_adv.core.awp import AWP
from lightning_adv.core.fgm import FGM
from lightning_adv.core.grads import GradientStash
from lightning_adv.core.params import match_parameters, select_trainable

__all__ = ["AWP", "FGM", "GradientStash", "ParameterAttack", "match_parameters", "select_trainable"]
