"""Plain re-implementations of the reference FGM, AWP, PGD and FreeLB snippets, written from the algorithms.

They keep the snippets' structure on purpose (a Python loop over named parameters, host-side checks such as
``if norm != 0``, ``param.data = ...`` rebinding, three saved weight-sized copies for AWP, a copy of every
gradient for PGD, the embeddings recomputed and fed as ``inputs_embeds`` for FreeLB): this is the baseline
practitioners paste into their projects. The tests use them as the numerical reference and the benchmarks as
the cost baseline. ``RefAWP.attack_backward`` and ``RefPGD.attack_backward`` take the loss closure and the
backward function (the snippets hard-code ``model(x, y, attention_mask)``, autocast and
``scaler.scale(loss).backward()``); ``RefFreeLB.attack_backward`` takes the batch, a forward that returns the
loss from keyword inputs, and the backward function.

Sources of the algorithms: FGM and AWP as in the competition write-ups; PGD as ``PGD`` in bert4torch
(``bert4torch/callbacks.py``, fyubang's competition snippet); FreeLB as ``freelb_train_step`` of zhuchen03/FreeLB
(``fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py``) in the form of its HuggingFace port (the perturbation
added to ``model.get_input_embeddings()(input_ids)`` and passed as ``inputs_embeds``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import torch
from torch import nn


class RefFGM:
    def __init__(self, model: nn.Module, epsilon: float, emb_name: str) -> None:
        self.model, self.epsilon, self.emb_name, self.backup = model, epsilon, emb_name, {}

    def attack(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and torch.isfinite(norm):
                    param.data.add_(self.epsilon * param.grad / norm)

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup = {}

    def saved_bytes(self) -> int:
        """Bytes held by the snippet's saved state during the attack: the backup of the embedding weights."""
        return sum(t.numel() * t.element_size() for t in self.backup.values())


class RefAWP:
    def __init__(self, model: nn.Module, adv_param: str, adv_lr: float, adv_eps: float, adv_step: int) -> None:
        self.model, self.adv_param, self.adv_lr, self.adv_eps, self.adv_step = model, adv_param, adv_lr, adv_eps, adv_step
        self.backup: Dict[str, torch.Tensor] = {}
        self.bounds: Dict[str, Any] = {}

    def attack_backward(self, loss_fn: Any, backward: Any) -> None:
        self._save()
        for _ in range(self.adv_step):
            self._attack_step()
            loss = loss_fn()
            self.model.zero_grad(set_to_none=True)
            backward(loss)
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup, self.bounds = {}, {}

    def _attack_step(self) -> None:
        e = 1e-6
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                norm1, norm2 = torch.norm(param.grad), torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    param.data.add_(self.adv_lr * param.grad / (norm1 + e) * (norm2 + e))
                    param.data = torch.min(torch.max(param.data, self.bounds[name][0]), self.bounds[name][1])

    def _save(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                if name not in self.backup:
                    self.backup[name] = param.data.clone()
                eps = self.adv_eps * param.abs().detach()
                self.bounds[name] = (self.backup[name] - eps, self.backup[name] + eps)

    def saved_bytes(self) -> int:
        """Bytes held by the snippet's saved state during the attack: the backup and both bounds."""
        total = sum(t.numel() * t.element_size() for t in self.backup.values())
        return total + sum(lo.numel() * lo.element_size() * 2 for lo, _ in self.bounds.values())


class RefPGD:
    """The competition PGD on the embedding weights, in its usual loop::

        pgd.backup_grad()
        for t in range(K):
            pgd.attack(is_first_attack=(t == 0))   # the first attack saves the embeddings
            if t != K - 1:
                model.zero_grad()                    # accumulate the perturbation, not the gradients
            else:
                pgd.restore_grad()                   # back to the clean gradient before the last pass
            loss_adv = loss_fn(); loss_adv.backward()
        pgd.restore()
    """

    def __init__(self, model: nn.Module, epsilon: float, alpha: float, steps: int, emb_name: str) -> None:
        self.model, self.epsilon, self.alpha, self.steps, self.emb_name = model, epsilon, alpha, steps, emb_name
        self.emb_backup: Dict[str, torch.Tensor] = {}
        self.grad_backup: Dict[str, torch.Tensor] = {}

    def attack_backward(self, loss_fn: Any, backward: Any) -> None:
        self.backup_grad()
        for t in range(self.steps):
            self.attack(is_first_attack=t == 0)
            if t != self.steps - 1:
                self.model.zero_grad(set_to_none=True)
            else:
                self.restore_grad()
            loss = loss_fn()
            backward(loss)
        self.restore()

    def attack(self, is_first_attack: bool = False) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(self.alpha * param.grad / norm)
                    param.data = self.project(name, param.data)

    def project(self, name: str, data: torch.Tensor) -> torch.Tensor:
        moved = data - self.emb_backup[name]
        if torch.norm(moved) > self.epsilon:
            moved = self.epsilon * moved / torch.norm(moved)
        return self.emb_backup[name] + moved

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def backup_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = self.grad_backup[name]

    def saved_bytes(self) -> int:
        """Bytes held by the snippet's saved state during the attack: the embedding backup and the gradient backup."""
        return sum(t.numel() * t.element_size() for d in (self.emb_backup, self.grad_backup) for t in d.values())


class RefFreeLB:
    """FreeLB as the HuggingFace-style snippet: ``1 + adv_steps`` passes on ``inputs_embeds = embed(input_ids) + delta``,
    each loss divided by ``1 + adv_steps``, the gradients of all passes accumulated; ``delta`` starts as
    per-example uniform noise on the real tokens (``attention_mask``) and moves by ``adv_lr * g / ||g||`` per example.
    """

    def __init__(
        self, model: nn.Module, adv_lr: float, adv_steps: int, adv_init_mag: float, adv_max_norm: float = 0.0,
        norm_type: str = "l2",
    ) -> None:
        self.model, self.adv_lr, self.adv_steps = model, adv_lr, adv_steps
        self.adv_init_mag, self.adv_max_norm, self.norm_type = adv_init_mag, adv_max_norm, norm_type

    def attack_backward(
        self, inputs: Mapping[str, torch.Tensor], forward: Callable[..., torch.Tensor], backward: Any
    ) -> torch.Tensor:
        """The whole micro-batch (clean pass included); returns the sum of the weighted losses."""
        input_ids = inputs["input_ids"]
        others = {k: v for k, v in inputs.items() if k != "input_ids"}
        embeds_init = self.model.get_input_embeddings()(input_ids)
        if self.adv_init_mag > 0:
            input_mask = inputs["attention_mask"].to(embeds_init)
            if self.norm_type == "l2":
                delta = torch.zeros_like(embeds_init).uniform_(-1, 1) * input_mask.unsqueeze(2)
                dims = torch.sum(input_mask, 1) * embeds_init.size(-1)
                magnitude = self.adv_init_mag / torch.sqrt(dims)
                delta = (delta * magnitude.view(-1, 1, 1)).detach()
            else:
                delta = torch.zeros_like(embeds_init).uniform_(-self.adv_init_mag, self.adv_init_mag)
                delta = (delta * input_mask.unsqueeze(2)).detach()
        else:
            delta = torch.zeros_like(embeds_init)
        total = torch.zeros((), device=embeds_init.device)
        for astep in range(1 + self.adv_steps):
            delta.requires_grad_()
            loss = forward(inputs_embeds=delta + embeds_init, **others) / (1 + self.adv_steps)
            total = total + loss.detach()
            backward(loss)
            if astep == self.adv_steps:
                break
            delta_grad = delta.grad.clone().detach()
            if self.norm_type == "l2":
                denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1)
                denorm = torch.clamp(denorm, min=1e-10)
                delta = (delta + self.adv_lr * delta_grad / denorm).detach()
                if self.adv_max_norm > 0:
                    delta_norm = torch.norm(delta.view(delta.size(0), -1).float(), p=2, dim=1).to(embeds_init).detach()
                    exceed = (delta_norm > self.adv_max_norm).to(embeds_init)
                    factor = self.adv_max_norm / delta_norm * exceed + (1 - exceed)
                    delta = (delta * factor.view(-1, 1, 1)).detach()
            else:
                denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1, p=float("inf")).view(-1, 1, 1)
                denorm = torch.clamp(denorm, min=1e-8)
                delta = (delta + self.adv_lr * delta_grad / denorm).detach()
                if self.adv_max_norm > 0:
                    delta = torch.clamp(delta, -self.adv_max_norm, self.adv_max_norm).detach()
            embeds_init = self.model.get_input_embeddings()(input_ids)
        return total
