"""Pure-PyTorch core of lightning_adv: the methods, their targets and the micro-batch engine. No Lightning import.

Usable in a hand-written loop::

    outcomes = adversarial_backward(model, [FGM(model), AWP(model)], loss_fn)   # clean + adversarial backward
    optimizer.step(); optimizer.zero_grad()

or, for a weight-space method, after your own ``loss.backward()``: ``fgm.attack_backward(loss_fn)``.
"""

from lightning_adv.core.awp import AWP
from lightning_adv.core.embedding import EmbeddingOutput, find_embedding
from lightning_adv.core.fgm import FGM
from lightning_adv.core.freelb import FreeLB
from lightning_adv.core.grads import GradientStash
from lightning_adv.core.method import Method, ParameterMethod
from lightning_adv.core.momentum_sam import MomentumSAM
from lightning_adv.core.neftune import NEFTune
from lightning_adv.core.params import match_parameters, select_trainable
from lightning_adv.core.pgd import PGD
from lightning_adv.core.r3f import R3F
from lightning_adv.core.rdrop import RDrop
from lightning_adv.core.robust import AttackResult, EmbeddingAttack, robust_accuracy
from lightning_adv.core.sam import SAM
from lightning_adv.core.smart import SMART
from lightning_adv.core.vat import VAT
from lightning_adv.core.contract import Contract
from lightning_adv.core.step import AttackStep, BackwardSync, Outcome, PassOutput, adversarial_backward, run_micro_batch
from lightning_adv.core.text_attack import TextAttackResult, deepwordbug_attack

__all__ = [
    "AttackResult", "EmbeddingAttack", "TextAttackResult", "deepwordbug_attack", "robust_accuracy",
    "AWP", "AttackStep", "BackwardSync", "Contract", "EmbeddingOutput", "FGM", "FreeLB", "GradientStash", "Method",
    "MomentumSAM", "NEFTune", "Outcome", "PGD", "ParameterMethod", "R3F", "RDrop", "SAM", "SMART", "VAT", "PassOutput", "adversarial_backward",
    "find_embedding", "match_parameters", "run_micro_batch", "select_trainable",
]
