"""Plain re-implementations of the reference FGM and AWP snippets, written from the article's description.

They keep the snippets' structure on purpose (a Python loop over named parameters, host-side checks such as
``if norm != 0``, ``param.data = ...`` rebinding, three saved weight-sized copies for AWP): this is the
baseline practitioners paste into their projects. The tests use them as the numerical reference and the
benchmarks as the cost baseline. ``RefAWP.attack_backward`` takes the loss closure and the backward function
(the snippet hard-codes ``model(x, y, attention_mask)``, autocast and ``scaler.scale(loss).backward()``).
"""

from __future__ import annotations

from typing import Any, Dict

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
