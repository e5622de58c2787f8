"""Plain re-implementations of the reference FGM, AWP, PGD, FreeLB, R3F, R-Drop, VAT, SMART, SAM and Momentum-SAM
snippets, written from the algorithms, and transformers' own NEFTune hook.

They keep the snippets' structure on purpose (a Python loop over named parameters, host-side checks such as
``if norm != 0``, ``param.data = ...`` rebinding, three saved weight-sized copies for AWP, a copy of every
gradient for PGD, the embeddings recomputed and fed as ``inputs_embeds`` for FreeLB): this is the baseline
practitioners paste into their projects. The tests use them as the numerical reference and the benchmarks as
the cost baseline. ``RefAWP.attack_backward`` and ``RefPGD.attack_backward`` take the loss closure and the
backward function (the snippets hard-code ``model(x, y, attention_mask)``, autocast and
``scaler.scale(loss).backward()``); ``RefFreeLB.attack_backward`` takes the batch, a forward that returns the
loss from keyword inputs, and the backward function; ``RefR3F.attack_backward`` and ``RefSMART.attack_backward``
take the batch, a forward that returns the model's output (``.loss`` when ``labels`` are given, ``.logits``) from
keyword inputs (a ``transformers`` model itself), and the backward function, and run the whole micro-batch.
``RefSAM`` is an optimizer wrapper used as its source is (``loss.backward(); first_step(zero_grad=True);
closure().backward(); second_step()``); ``RefMSAM`` is an optimizer (``torch.optim.Optimizer``) that replaces
AdamW; ``RefNEFTune.attack_backward`` takes what ``RefFreeLB.attack_backward`` takes.

Sources of the algorithms: FGM and AWP as in the competition write-ups; PGD as ``PGD`` in bert4torch
(``bert4torch/callbacks.py``, fyubang's competition snippet); FreeLB as ``freelb_train_step`` of zhuchen03/FreeLB
(``fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py``) in the form of its HuggingFace port (the perturbation
added to ``model.get_input_embeddings()(input_ids)`` and passed as ``inputs_embeds``); R3F as the criterion
``sentence_prediction_r3f`` of fairseq (``examples/rxf``), moved to a HuggingFace model the usual way (the token
embeddings computed once and passed as ``inputs_embeds``); R-Drop as the README and ``compute_kl_loss`` of
dropreg/R-Drop (``RefRDrop.attack_backward`` takes what ``RefR3F.attack_backward`` takes); VAT as ``VAT`` of
bert4torch (``bert4torch/callbacks.py``; ``RefVAT`` as ``RefR3F``); SMART as ``SmartPerturbation`` of namisan/mt-dnn
(``mt_dnn/perturbation.py``, with ``stable_kl`` and ``SymKlCriterion`` of ``mt_dnn/loss.py``) and mt-dnn's
``loss + adv_alpha * adv_loss``; SAM/ASAM as the ``SAM`` optimizer of davda54/sam (``sam.py``: ``first_step``,
``second_step``); Momentum-SAM as ``AdamW_MSAM`` of MarlonBecker/MSAM (``optimizer/adamW_msam.py``); NEFTune is
``transformers.integrations.neftune.neftune_post_forward_hook`` itself, registered as transformers' Trainer does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F


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


def _kl_dtype(logits: torch.Tensor) -> torch.dtype:
    """The snippets compute their divergences in float32 (``dtype=torch.float32``, ``.float()``); float64 logits
    (the equality tests) keep float64."""
    return torch.promote_types(logits.dtype, torch.float32)


class RefR3F:
    """R3F as practitioners write it from fairseq's ``sentence_prediction_r3f``, on a HuggingFace model::

        token_embeddings = model.get_input_embeddings()(input_ids)
        out = model(inputs_embeds=token_embeddings, attention_mask=..., labels=...)        # clean: loss, logits
        noise = U(-eps, eps) on the real tokens
        noised_logits = model(inputs_embeds=token_embeddings.detach().clone() + noise, attention_mask=...).logits
        (out.loss + r3f_lambda * symmetric_kl(noised_logits, out.logits)).backward()

    ``symmetric_kl``: ``KL(p_clean || p_noised) + KL(p_noised || p_clean)`` summed over the classes, divided by the
    batch size, gradients through both logits. fairseq sums the cross entropy and multiplies the KL by the sample
    size; with the batch-mean loss of a HuggingFace model both terms are divided by the batch size instead.
    """

    def __init__(
        self, model: nn.Module, eps: float, r3f_lambda: float, noise_type: str = "uniform",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.model, self.eps, self.r3f_lambda, self.noise_type, self.generator = model, eps, r3f_lambda, noise_type, generator

    @staticmethod
    def symmetric_kl(noised_logits: torch.Tensor, input_logits: torch.Tensor) -> torch.Tensor:
        t = _kl_dtype(noised_logits)
        forward_kl = F.kl_div(F.log_softmax(noised_logits, dim=-1, dtype=t), F.softmax(input_logits, dim=-1, dtype=t),
                              reduction="sum")
        backward_kl = F.kl_div(F.log_softmax(input_logits, dim=-1, dtype=t), F.softmax(noised_logits, dim=-1, dtype=t),
                               reduction="sum")
        return (forward_kl + backward_kl) / noised_logits.size(0)

    def attack_backward(self, inputs: Mapping[str, torch.Tensor], forward: Callable[..., Any], backward: Any) -> torch.Tensor:
        """The whole micro-batch; returns the regularised loss (detached)."""
        input_ids = inputs["input_ids"]
        others = {k: v for k, v in inputs.items() if k != "input_ids"}
        unlabelled = {k: v for k, v in others.items() if k != "labels"}
        token_embeddings = self.model.get_input_embeddings()(input_ids)
        out = forward(inputs_embeds=token_embeddings, **others)
        loss, input_logits = out.loss, out.logits
        noise = torch.empty_like(token_embeddings)
        if self.noise_type == "uniform":
            noise.uniform_(-self.eps, self.eps, generator=self.generator)
        else:
            noise.normal_(0.0, self.eps, generator=self.generator)
        noise = noise * inputs["attention_mask"].unsqueeze(-1).to(noise)  # the real tokens only
        noised_embeddings = token_embeddings.detach().clone() + noise
        noised_logits = forward(inputs_embeds=noised_embeddings, **unlabelled).logits
        loss = loss + self.r3f_lambda * self.symmetric_kl(noised_logits, input_logits)
        backward(loss)
        return loss.detach()


class RefRDrop:
    """R-Drop as dropreg/R-Drop's README and ``compute_kl_loss`` write it, on a HuggingFace model::

        out1 = model(**inputs); out2 = model(**inputs)                        # keep dropout and forward twice
        ce_loss = 0.5 * (out1.loss + out2.loss)
        kl_loss = (KL(p2 || p1) + KL(p1 || p2)) / 2    # F.kl_div(..., reduction="none").sum(): summed over the batch
        (ce_loss + alpha * kl_loss).backward()

    ``reduction="batchmean"`` divides the KL by the batch size (the source's "mean" comment); the KL in float32.
    """

    def __init__(self, model: nn.Module, alpha: float, reduction: str = "sum") -> None:
        self.model, self.alpha, self.reduction = model, alpha, reduction

    def compute_kl_loss(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        t = _kl_dtype(p)
        p_loss = F.kl_div(F.log_softmax(p, dim=-1, dtype=t), F.softmax(q, dim=-1, dtype=t), reduction="none").sum()
        q_loss = F.kl_div(F.log_softmax(q, dim=-1, dtype=t), F.softmax(p, dim=-1, dtype=t), reduction="none").sum()
        loss = (p_loss + q_loss) / 2
        return loss / p.size(0) if self.reduction == "batchmean" else loss

    def attack_backward(self, inputs: Mapping[str, torch.Tensor], forward: Callable[..., Any], backward: Any) -> torch.Tensor:
        """The whole micro-batch (both forwards); returns the R-Drop loss (detached)."""
        out1 = forward(**inputs)
        out2 = forward(**inputs)
        loss = 0.5 * (out1.loss + out2.loss) + self.alpha * self.compute_kl_loss(out1.logits, out2.logits)
        backward(loss)
        return loss.detach()


class RefVAT:
    """VAT as bert4torch's ``VAT`` (``bert4torch/callbacks.py``) and its ``AdversarialTraining`` callback run it, on a
    HuggingFace model (bert4torch's forward hook keeps the word-embedding output; here it is computed once and passed
    as ``inputs_embeds``)::

        embed = model.get_input_embeddings()(input_ids)
        out = model(inputs_embeds=embed, ..., labels=...)                       # clean: loss, logits
        noise = N(0, 1) * noise_var on every token, requires_grad
        adv_logits = model(inputs_embeds=embed.data.detach() + noise, ...).logits
        delta_grad, = torch.autograd.grad(kl(adv_logits, logits.detach(), "batchmean"), noise)
        if delta_grad.norm() is nan or inf: no regulariser                       # a host-side check, as bert4torch
        noise = adv_project(noise + delta_grad * adv_step_size)                 # per token
        adv_logits = model(inputs_embeds=(embed.data.detach() + noise).detach(), ...).logits
        (out.loss + adv_alpha * (kl(adv_logits, logits.detach()) + kl(logits, adv_logits.detach()))).backward()

    ``kl(inputs, targets)``: ``F.kl_div(log_softmax(inputs), softmax(targets), reduction="sum")``, in float32.
    """

    def __init__(
        self, model: nn.Module, adv_alpha: float = 1.0, adv_step_size: float = 1e-3, noise_var: float = 1e-5,
        noise_gamma: float = 1e-6, norm_type: str = "l2", generator: Optional[torch.Generator] = None,
    ) -> None:
        self.model, self.adv_alpha, self.adv_step_size = model, adv_alpha, adv_step_size
        self.noise_var, self.noise_gamma, self.norm_type, self.generator = noise_var, noise_gamma, norm_type, generator

    @staticmethod
    def kl(inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        t = _kl_dtype(inputs)
        return F.kl_div(F.log_softmax(inputs, dim=-1, dtype=t), F.softmax(targets, dim=-1, dtype=t), reduction=reduction)

    def adv_project(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm_type == "l2":
            return grad / (torch.norm(grad, dim=-1, keepdim=True) + self.noise_gamma)
        if self.norm_type == "l1":
            return grad.sign()
        return grad / (grad.abs().max(-1, keepdim=True)[0] + self.noise_gamma)

    def attack_backward(self, inputs: Mapping[str, torch.Tensor], forward: Callable[..., Any], backward: Any) -> torch.Tensor:
        """The whole micro-batch; returns the regularised loss (detached)."""
        others = {k: v for k, v in inputs.items() if k != "input_ids"}
        unlabelled = {k: v for k, v in others.items() if k != "labels"}
        embed = self.model.get_input_embeddings()(inputs["input_ids"])
        out = forward(inputs_embeds=embed, **others)
        loss, logits = out.loss, out.logits
        noise = embed.data.new(embed.size()).normal_(0, 1, generator=self.generator) * self.noise_var
        noise.requires_grad_()
        adv_logits = forward(inputs_embeds=embed.data.detach() + noise, **unlabelled).logits
        (delta_grad,) = torch.autograd.grad(self.kl(adv_logits, logits.detach(), "batchmean"), noise, only_inputs=True)
        norm = delta_grad.norm()
        if not (torch.isnan(norm) or torch.isinf(norm)):
            noise = self.adv_project(noise + delta_grad * self.adv_step_size)
            adv_logits = forward(inputs_embeds=(embed.data.detach() + noise).detach(), **unlabelled).logits
            loss = loss + self.adv_alpha * (self.kl(adv_logits, logits.detach()) + self.kl(logits, adv_logits.detach()))
        backward(loss)
        return loss.detach()


class RefSMART:
    """SMART as mt-dnn's ``SmartPerturbation`` plus the training step around it::

        embed = model.get_input_embeddings()(input_ids)
        out = model(inputs_embeds=embed, ..., labels=...)                   # clean: loss, logits
        noise = N(0, 1) * noise_var on the real tokens, requires_grad
        for _ in range(steps):
            adv_logits = model(inputs_embeds=embed + noise, ...).logits
            delta_grad, = torch.autograd.grad(stable_kl(adv_logits, logits.detach(), reduce=False), noise)
            if delta_grad.norm() is nan or inf: no regulariser this step    # a host-side check, as mt-dnn
            noise = normalise(noise + step_size * delta_grad).detach().requires_grad_()   # per token
        adv_logits = model(inputs_embeds=embed + noise, ...).logits
        (out.loss + adv_alpha * SymKlCriterion(logits, adv_logits)).backward()

    ``embed`` keeps its graph: the adversarial branch trains the word embeddings too (as in mt-dnn).
    """

    def __init__(
        self, model: nn.Module, adv_alpha: float = 1.0, step_size: float = 1e-3, noise_var: float = 1e-5,
        epsilon: float = 1e-6, steps: int = 1, norm: str = "inf", generator: Optional[torch.Generator] = None,
    ) -> None:
        self.model, self.adv_alpha, self.step_size, self.noise_var = model, adv_alpha, step_size, noise_var
        self.epsilon, self.steps, self.norm, self.generator = epsilon, steps, norm, generator

    @staticmethod
    def stable_kl(logit: torch.Tensor, target: torch.Tensor, epsilon: float = 1e-6, reduce: bool = True) -> torch.Tensor:
        t = _kl_dtype(logit)
        logit = logit.view(-1, logit.size(-1)).to(t)
        target = target.view(-1, target.size(-1)).to(t)
        p, y = F.log_softmax(logit, 1).exp(), F.log_softmax(target, 1).exp()
        rp = -(1.0 / (p + epsilon) - 1 + epsilon).detach().log()
        ry = -(1.0 / (y + epsilon) - 1 + epsilon).detach().log()
        total = (p * (rp - ry) * 2).sum()
        return total / logit.size(0) if reduce else total

    @staticmethod
    def sym_kl(logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
        """``SymKlCriterion(input=logits, target=adv_logits)``: each KL differentiates its log side only."""
        t = _kl_dtype(logits)
        logits, adv_logits = logits.to(t), adv_logits.to(t)
        return F.kl_div(F.log_softmax(logits, dim=-1), F.softmax(adv_logits.detach(), dim=-1), reduction="batchmean") + \
            F.kl_div(F.log_softmax(adv_logits, dim=-1), F.softmax(logits.detach(), dim=-1), reduction="batchmean")

    def norm_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "l2":
            return grad / (torch.norm(grad, dim=-1, keepdim=True) + self.epsilon)
        if self.norm == "l1":
            return grad.sign()
        return grad / (grad.abs().max(-1, keepdim=True)[0] + self.epsilon)

    def attack_backward(self, inputs: Mapping[str, torch.Tensor], forward: Callable[..., Any], backward: Any) -> torch.Tensor:
        """The whole micro-batch; returns the regularised loss (detached)."""
        input_ids = inputs["input_ids"]
        others = {k: v for k, v in inputs.items() if k != "input_ids"}
        unlabelled = {k: v for k, v in others.items() if k != "labels"}
        embed = self.model.get_input_embeddings()(input_ids)
        out = forward(inputs_embeds=embed, **others)
        loss, logits = out.loss, out.logits
        noise = torch.empty_like(embed).normal_(0, 1, generator=self.generator) * self.noise_var
        noise = (noise * inputs["attention_mask"].unsqueeze(-1).to(noise)).detach()
        noise.requires_grad_()
        for _ in range(self.steps):
            adv_logits = forward(inputs_embeds=embed + noise, **unlabelled).logits
            adv_loss = self.stable_kl(adv_logits, logits.detach(), reduce=False)
            (delta_grad,) = torch.autograd.grad(adv_loss, noise, only_inputs=True, retain_graph=False)
            norm = delta_grad.norm()
            if torch.isnan(norm) or torch.isinf(norm):
                backward(loss)
                return loss.detach()
            noise = self.norm_grad(noise + delta_grad * self.step_size)
            noise = noise.detach()
            noise.requires_grad_()
        adv_logits = forward(inputs_embeds=embed + noise, **unlabelled).logits
        loss = loss + self.adv_alpha * self.sym_kl(logits, adv_logits)
        backward(loss)
        return loss.detach()


class RefSAM:
    """davda54/sam's ``SAM`` optimizer, its two steps written out from the source (one parameter group)::

        loss_fn().backward()
        sam.first_step(zero_grad=True)   # per parameter holding a gradient: old_p = p.clone(); p += e_w
        loss_fn().backward()             # the gradient at w + e(w)
        sam.second_step()                # per parameter: p.data = old_p; then the base optimizer's step

    ``e_w = rho * g / (||g|| + 1e-12)``, the norm over every gradient (a stack of per-parameter norms); ASAM
    (``adaptive``): ``rho * w^2 * g / (||w * g|| + 1e-12)``. The copies ``old_p`` stay in the optimizer's state
    between steps, as in the source (after ``second_step`` they are the parameters' storage). ``base_optimizer``:
    the optimizer ``second_step`` steps (the source builds it from its own parameter groups); ``None``: the caller
    steps it (the benchmark's loop, which goes through its GradScaler).
    """

    def __init__(self, model: nn.Module, rho: float = 0.05, adaptive: bool = False,
                 base_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        assert rho >= 0.0, f"Invalid rho, should be non-negative: {rho}"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rho, self.adaptive, self.base_optimizer = rho, adaptive, base_optimizer
        self.state: Dict[torch.Tensor, Dict[str, torch.Tensor]] = {}

    def _grad_norm(self) -> torch.Tensor:
        shared_device = self.params[0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2).to(shared_device)
            for p in self.params if p.grad is not None
        ]), p=2)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        scale = self.rho / (grad_norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.state.setdefault(p, {})["old_p"] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)  # up to w + e(w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.state[p]["old_p"]  # back to w
        if self.base_optimizer is not None:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def attack_backward(self, loss_fn: Any, backward: Any) -> None:
        """After the clean backward: ``first_step(zero_grad=True)``, the pass at ``w + e(w)``, ``second_step()``."""
        self.first_step(zero_grad=True)
        backward(loss_fn())
        self.second_step()

    def saved_bytes(self) -> int:
        """Bytes held by the snippet's saved state during the attack: the copies ``old_p``."""
        return sum(s["old_p"].numel() * s["old_p"].element_size() for s in self.state.values() if "old_p" in s)


class RefMSAM(torch.optim.Optimizer):
    """MarlonBecker/MSAM's ``AdamW_MSAM`` written out from the source (one parameter group): between steps the stored
    weights stay at the ascent point ``w - rho * m / ||m||`` (``m``: AdamW's ``exp_avg``), so the user's clean
    forward and backward run there; ``step()`` goes per parameter: back to ``w`` (``+ norm_factor * m``), the AdamW
    update (decoupled weight decay applied after it, as in the source: ``torch.optim.AdamW`` applies it before), then,
    with the norm of the new momentum over every parameter, up again (``- norm_factor * m``). ``norm_factor`` is
    kept as the source keeps it (a 0-dim tensor, used as ``alpha``). :meth:`move_back_from_momentumAscent` returns the
    stored weights to ``w`` (evaluation, the end of training). The equality tests use ``weight_decay=0``, where the
    order of the decay does not matter.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: Any = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, rho: float = 0.3) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho))
        if len(self.param_groups) > 1:
            raise ValueError("RefMSAM: one parameter group, as the source")
        self.norm_factor: Any = 0.0

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        exp_avgs = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
            exp_avgs.append(exp_avg)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            p.add_(exp_avg, alpha=self.norm_factor)  # descent: back from the ascent point
            exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            p.mul_(1 - lr * weight_decay)
        if not exp_avgs:
            return loss
        ascent_norm = torch.norm(torch.stack([m.norm(p=2) for m in exp_avgs]), p=2)
        self.norm_factor = 1 / (ascent_norm + 1e-12) * group["rho"]
        for p in group["params"]:  # ascent
            if "exp_avg" in self.state[p]:
                p.sub_(self.state[p]["exp_avg"], alpha=self.norm_factor)
        return loss

    @torch.no_grad()
    def move_back_from_momentumAscent(self) -> None:
        for p in self.param_groups[0]["params"]:
            if "exp_avg" in self.state[p]:
                p.add_(self.state[p]["exp_avg"], alpha=self.norm_factor)
        self.norm_factor = 0.0

    @torch.no_grad()
    def move_up_to_momentumAscent(self) -> None:
        for p in self.param_groups[0]["params"]:
            if "exp_avg" in self.state[p]:
                p.sub_(self.state[p]["exp_avg"], alpha=self.norm_factor)


class RefNEFTune:
    """NEFTune as transformers runs it: ``neftune_post_forward_hook`` (imported from
    ``transformers.integrations.neftune``) registered on ``model.get_input_embeddings()`` with
    ``neftune_noise_alpha`` set on that module, as ``Trainer`` does when ``neftune_noise_alpha`` is given. The hook
    adds ``U(-m, m)``, ``m = alpha / sqrt(L * d)`` (``L`` the padded length), to the embedding output of every forward
    in training mode.

    Transformers registers it once for the whole ``train()``; :meth:`attack_backward` registers it around one clean
    forward and backward (a dict insertion and removal per step), so that a model shared with other code runs without
    it outside. It takes what ``RefFreeLB.attack_backward`` takes: the batch, a forward returning the loss from
    keyword inputs, and the backward function.
    """

    def __init__(self, model: nn.Module, noise_alpha: float = 5.0) -> None:
        from transformers.integrations.neftune import neftune_post_forward_hook  # imported here: not inside a step

        self.hook = neftune_post_forward_hook
        self.embedding = model.get_input_embeddings()
        self.noise_alpha = noise_alpha
        self.handle: Any = None

    def activate(self) -> None:
        self.embedding.neftune_noise_alpha = self.noise_alpha
        self.handle = self.embedding.register_forward_hook(self.hook)

    def deactivate(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if hasattr(self.embedding, "neftune_noise_alpha"):
            del self.embedding.neftune_noise_alpha

    def attack_backward(
        self, inputs: Mapping[str, torch.Tensor], forward: Callable[..., torch.Tensor], backward: Any
    ) -> torch.Tensor:
        """The whole micro-batch: the clean forward with the hook, its backward; returns the loss (detached)."""
        self.activate()
        try:
            loss = forward(**inputs)
            backward(loss)
        finally:
            self.deactivate()
        return loss.detach()
