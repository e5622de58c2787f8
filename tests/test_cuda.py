"""On a CUDA GPU (issue 14): every method in ``16-mixed`` (Lightning's CUDA GradScaler) and ``bf16-mixed`` against a
hand-written ``torch.autocast`` (+ ``torch.amp.GradScaler``) loop running the reference algorithm, with overflow steps
skipped and counted; no host-device synchronisation in the attack arithmetic; GPU memory flat over 100 steps;
RobustAccuracy under autocast; FSDP on one GPU equal to one device.

Every test here carries the ``cuda`` marker and is skipped without a CUDA device (CI is CPU-only)::

    pytest -m cuda            # on a GPU machine

``LIGHTNING_ADV_TEST_DEVICE=cpu`` runs the device-independent ones on the CPU (to debug them without a GPU).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch.nn import functional as F

from helpers import SGDLogits, TextModule, TinyText, loader, make_data, max_diff, trainer
from reference_snippets import RefAWP, RefFGM
from test_equivalence import AWP_KW, FGM_KW
from test_methods import LFREELB, LPGD, freelb_micro, pgd_micro, plain_fit
from test_smoothness import reference_r3f, reference_smart

from lightning_adv import (
    AWP, FGM, PGD, R3F, SAM, SMART, AWPCallback, FGMCallback, FreeLB, FreeLBCallback, MomentumSAM, MomentumSAMCallback,
    NEFTune, NEFTuneCallback, PGDCallback, R3FCallback, RobustAccuracy, SAMCallback, SMARTCallback,
)
from lightning_adv.core import EmbeddingAttack, adversarial_backward

DEVICE = os.environ.get("LIGHTNING_ADV_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_cuda = pytest.mark.skipif(not (ON_CUDA and torch.cuda.is_available()), reason="needs a CUDA GPU")
HERE = os.path.dirname(os.path.abspath(__file__))

EMB = "embeddings.word_embeddings"
KW: Dict[str, Dict[str, Any]] = {
    "fgm": dict(FGM_KW),
    "awp": dict(AWP_KW),
    "pgd": dict(LPGD),
    "freelb": dict(LFREELB),
    "r3f": dict(eps=0.3, r3f_lambda=2.0),
    "smart": dict(adv_alpha=3.0, step_size=0.5, noise_var=0.1),
}
METHODS = list(KW)
GRADIENT_METHODS = ("fgm", "awp", "pgd", "freelb")  # their attack reads the clean gradient: skipped when it overflows


def make_callback(method: str) -> Callback:
    kw = KW[method]
    return {
        "fgm": lambda: FGMCallback(**kw),
        "awp": lambda: AWPCallback(**kw),
        "pgd": lambda: PGDCallback(**kw),
        "freelb": lambda: FreeLBCallback(adv_init_mag=0.0, embedding="model." + EMB, **kw),
        "r3f": lambda: R3FCallback(embedding="model." + EMB, **kw),
        "smart": lambda: SMARTCallback(embedding="model." + EMB, **kw),
    }[method]()


def generator() -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(11)


class SeededNoise(Callback):
    """R3F and SMART draw their noise from a generator on the device, seeded as the reference's."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        for cb in trainer.callbacks:
            method = getattr(cb, "method", None)
            if method is not None and hasattr(method, "generator"):
                method.generator = generator()


def reference_micro(method: str) -> Callable[..., float]:
    """One micro-batch of the reference algorithm: ``micro(model, ids, y, ctx, backward)`` (``ctx``: autocast)."""
    kw = KW[method]
    if method == "pgd":
        return pgd_micro(**kw)
    if method == "freelb":
        return freelb_micro(**kw, weight_clean_after=True)  # the form the library must use (see test_methods)
    if method in ("r3f", "smart"):
        gen = generator()

        def smooth(model, ids, y, ctx, backward):
            if method == "r3f":
                reference_r3f(model, ids, y, kw["eps"], kw["r3f_lambda"], "uniform", gen, ctx=ctx, backward=backward)
            else:
                reference_smart(model, ids, y, kw["adv_alpha"], kw["step_size"], kw["noise_var"], 1e-6, 1, "inf", gen,
                                ctx=ctx, backward=backward)
            return 0.0

        return smooth

    def micro(model, ids, y, ctx, backward):
        def loss_fn():
            with ctx():
                return F.cross_entropy(model(ids), y)

        backward(loss_fn())
        if method == "fgm":
            fgm = RefFGM(model, **kw)
            fgm.attack()
            backward(loss_fn())
            fgm.restore()
        else:
            RefAWP(model, **kw).attack_backward(loss_fn, backward)
        return 0.0

    return micro


def counting_overflows(micro: Callable[..., float], overflows: List[bool]) -> Callable[..., float]:
    """Record, per micro-batch, whether its clean gradient (the first backward's) is not finite."""

    def wrapped(model, ids, y, ctx, backward):
        first = [True]

        def counted(loss: torch.Tensor) -> None:
            backward(loss)
            if first[0]:
                first[0] = False
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                overflows.append(not all(bool(torch.isfinite(g).all()) for g in grads))

        return micro(model, ids, y, ctx, counted)

    return wrapped


def overflowing_scaler() -> torch.amp.GradScaler:
    """A scaler whose first steps overflow in fp16 for sure (2**40) and that backs off fast (/256 per skip)."""
    return torch.amp.GradScaler(DEVICE, init_scale=2.0**40, backoff_factor=2.0**-8)


# -- 1. mixed precision against the hand-written autocast loop ----------------------------------------------------


def tolerance(method: str, precision: str) -> float:
    """The same operations in the same order: equal up to float32 rounding. R3F is the exception: the logits of the
    clean pass get the divergence's gradient from two uses (fairseq sums them in the autocast dtype, one bf16/fp16
    rounding each; the library sums them in float32 and rounds once), so they differ by the format's rounding
    (float64: equal to 1e-12, tests/test_smoothness.py). Measured on the CPU: bf16 1.1e-4, fp16 1.5e-6."""
    if method == "r3f":
        return 2e-3 if precision == "bf16-mixed" else 2e-4
    return 1e-5


def mixed_pair(method: str, precision: str, *, epochs: int = 3, accumulate: int = 2):
    smooth = method in ("r3f", "smart")
    module = SGDLogits(dtype=torch.float32) if smooth else TextModule(dtype=torch.float32)
    reference = copy.deepcopy(module).to(DEVICE)
    cb = make_callback(method)
    lightning_scaler = overflowing_scaler() if precision == "16-mixed" else None
    extra: Dict[str, Any] = (dict(plugins=[MixedPrecision("16-mixed", DEVICE, scaler=lightning_scaler)])
                             if precision == "16-mixed" else dict(precision=precision))
    t = trainer(accelerator=DEVICE, deterministic=False, max_epochs=epochs, accumulate_grad_batches=accumulate,
                callbacks=[cb, SeededNoise()], **extra)
    ds = make_data(16)
    t.fit(module, loader(ds))
    batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in loader(ds)]
    overflows: List[bool] = []
    ref_scaler = overflowing_scaler() if precision == "16-mixed" else None
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    plain_fit(reference, batches, counting_overflows(reference_micro(method), overflows), epochs=epochs,
              accumulate=accumulate, autocast_dtype=dtype, scaler=ref_scaler)
    return module, reference, cb, overflows, lightning_scaler, ref_scaler


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("method", METHODS)
def test_mixed_precision_equals_autocast_reference(method: str, precision: str) -> None:
    module, reference, cb, overflows, scaler, ref_scaler = mixed_pair(method, precision)
    diff = max_diff(module.model, reference.model)
    assert diff < tolerance(method, precision), f"{method} {precision}: max |w - w_ref| = {diff:.3g}"
    assert cb.attacks == len(overflows) == 12
    # the module trained (not every step skipped) and moved away from its start
    assert max_diff(module.model, TextModule(dtype=torch.float32).model.to(DEVICE)) > 1e-3
    if precision == "16-mixed":
        # the first steps overflow (scale 2**40): the optimizer skips them in both loops, the scale follows the same path
        assert any(overflows) and not all(overflows), overflows
        assert scaler.get_scale() == ref_scaler.get_scale() < 2.0**40
        expected = sum(overflows) if method in GRADIENT_METHODS else 0  # R3F/SMART never read the gradient
        assert cb.skipped == expected, (cb.skipped, overflows)
    else:
        assert not any(overflows) and cb.skipped == 0


def test_freelb_mixed_precision_close_to_the_source_form() -> None:
    """fairseq divides the clean loss by 1 + K before its backward; the library weights the gradient after it (the
    backward is Lightning's): in fp16 the two round differently, by the format's epsilon, not more."""
    module, _, _, _, _, _ = mixed_pair("freelb", "16-mixed")
    source = copy.deepcopy(TextModule(dtype=torch.float32)).to(DEVICE)
    batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in loader(make_data(16))]
    plain_fit(source, batches, freelb_micro(**LFREELB), epochs=3, accumulate=2, autocast_dtype=torch.float16,
              scaler=overflowing_scaler())
    assert max_diff(module.model, source.model) < 5e-3


# -- 2. no host-device synchronisation in the attack arithmetic ---------------------------------------------------


class SyncFree:
    """``torch.cuda.set_sync_debug_mode("error")`` around the attack; the loss and the backward (the user's
    code) run with it off."""

    def __enter__(self) -> "SyncFree":
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.set_sync_debug_mode(self.previous)

    def allowed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        return run


def core_method(method: str, model: torch.nn.Module) -> Any:
    kw = KW[method]
    return {
        "fgm": lambda: FGM(model, **kw),
        "awp": lambda: AWP(model, **kw),
        "pgd": lambda: PGD(model, **kw),
        "freelb": lambda: FreeLB(model, adv_init_mag=0.3, embedding=EMB, **kw),  # the random start too
        "r3f": lambda: R3F(model, embedding=EMB, **kw),
        "smart": lambda: SMART(model, embedding=EMB, **kw),
    }[method]()


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_attack_arithmetic_has_no_host_sync(method: str, precision: str) -> None:
    torch.manual_seed(0)
    model = TinyText().to(DEVICE)
    ids, y = (t.to(DEVICE) for t in make_data(8)[:])
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    attack = core_method(method, model)
    with SyncFree() as guard:

        @guard.allowed
        def loss_fn() -> Any:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                logits = model(ids)
                return {"loss": F.cross_entropy(logits, y), "logits": logits}

        @guard.allowed
        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        for _ in range(3):  # an attack with gradients already accumulated, too
            (outcome,) = adversarial_backward(model, [attack], loss_fn, backward)
    assert not bool(outcome.skipped)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@needs_cuda
def test_robust_attack_has_no_host_sync() -> None:
    torch.manual_seed(0)
    model = TinyText().to(DEVICE).eval()
    ids, y = (t.to(DEVICE) for t in make_data(8)[:])
    attack = EmbeddingAttack(model, epsilon=[0.5, 1.0], norm_type="l2", steps=3, random_start=True, embedding=EMB)
    with SyncFree(), torch.autocast("cuda", dtype=torch.bfloat16):
        result = attack.run(lambda: model(ids), y)
    assert result.logits.shape == (2, 8, 3) and all(p.grad is None for p in model.parameters())


# -- 3. memory does not grow --------------------------------------------------------------------------------------


class MemoryTrace(Callback):
    def __init__(self) -> None:
        self.allocated: List[int] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.allocated.append(torch.cuda.memory_allocated())


def _growth(callbacks: List[Callback], precision: str, smooth: bool) -> int:
    trace = MemoryTrace()
    module = SGDLogits() if smooth else TextModule()
    trainer(accelerator="cuda", deterministic=False, max_steps=120, precision=precision,
            callbacks=callbacks + [trace]).fit(module, loader(make_data(480), batch_size=4))
    assert len(trace.allocated) == 120
    return max(trace.allocated[60:]) - trace.allocated[19]


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_gpu_memory_does_not_grow_over_100_steps(method: str) -> None:
    smooth = method in ("r3f", "smart")
    baseline = _growth([], "bf16-mixed", smooth)
    growth = _growth([make_callback(method)], "bf16-mixed", smooth)
    assert growth <= max(baseline, 0) + 16 * 1024, f"{method}: +{growth} B from step 20 to 120 (plain: +{baseline} B)"


# -- 4. RobustAccuracy under autocast -----------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_robust_accuracy_under_autocast_equals_the_core(precision: str) -> None:
    from test_robust import RobustModule, batches, core, eval_loader, examples, trained

    net, rows = copy.deepcopy(trained()).to(DEVICE), examples(40, seed=8)
    robust = RobustAccuracy(epsilon=[0.5, 1.0])
    metrics = trainer(accelerator="cuda", deterministic=False, callbacks=[robust], precision=precision).validate(
        RobustModule(net), eval_loader(rows), verbose=False)[0]
    net.to(DEVICE)  # Lightning moved it back to the CPU
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    on_device = [tuple(t.to(DEVICE) for t in b) for b in batches(rows, 5)]
    with torch.autocast("cuda", dtype=dtype):
        expected = core(net, on_device, epsilon=[0.5, 1.0])
    fp32 = core(net, on_device, epsilon=[0.5, 1.0])
    for key in ("robust_acc@0.5", "robust_acc@1", "robust_loss_gain@1"):
        assert metrics[f"val_{key}"] == pytest.approx(expected[key], abs=1e-3), key
        assert metrics[f"val_{key}"] == pytest.approx(fp32[key], abs=0.1), key  # autocast changes little
    assert metrics["val_robust_acc@1"] < expected["clean_acc"]


# -- 5. FSDP on one GPU ---------------------------------------------------------------------------------------------


@needs_cuda
def test_fsdp_on_one_gpu_equals_one_device(tmp_path: Any) -> None:
    """Lightning's own FSDPStrategy on the GPU (NO_SHARD): FreeLB, R3F and SMART, with and without accumulation, end
    with the weights of the default strategy; FGM, AWP, PGD and RobustAccuracy are refused with their reason
    (tests/fsdp_script.py in a subprocess: FSDP initialises a process group; tests/test_fsdp.py runs it on the CPU)."""
    from test_fsdp import check_one_device_report, run_fsdp_script

    check_one_device_report(run_fsdp_script(tmp_path / "fsdp.json", "cuda"), tol=1e-5)


# -- 6. SAM, ASAM, Momentum-SAM and NEFTune (on the method contract) ----------------------------------------------

NEW_CALLBACKS = {
    "sam": lambda: SAMCallback(rho=0.1),
    "asam": lambda: SAMCallback(rho=0.5, adaptive=True),
    "msam": lambda: MomentumSAMCallback(rho=0.3),
    "neftune": lambda: NEFTuneCallback(noise_alpha=5.0, embedding="model." + EMB),
}


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["sam", "asam", "msam", "neftune"])
def test_new_methods_have_no_host_sync(method: str, precision: str) -> None:
    torch.manual_seed(0)
    model = TinyText().to(DEVICE)
    ids, y = (t.to(DEVICE) for t in make_data(8)[:])
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(ids), y).backward()
    opt.step()  # a momentum for Momentum-SAM
    opt.zero_grad()
    attack = {"sam": lambda: SAM(model, rho=0.1), "asam": lambda: SAM(model, rho=0.5, adaptive=True),
              "msam": lambda: MomentumSAM(model, opt, rho=0.3), "neftune": lambda: NEFTune(model, embedding=EMB)}[method]()
    with SyncFree() as guard:

        @guard.allowed
        def loss_fn() -> Any:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                return F.cross_entropy(model(ids), y)

        @guard.allowed
        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        for _ in range(3):
            (outcome,) = adversarial_backward(model, [attack], loss_fn, backward)
    assert not bool(outcome.skipped)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("method", ["sam", "asam", "msam", "neftune"])
def test_new_methods_16_mixed_with_an_overflowing_scaler(method: str) -> None:
    """Lightning's GradScaler on the device, its first steps overflowing: the perturbation of an overflowing step is
    skipped (SAM) or harmless (the scaler skips the step), training ends finite and attacked."""
    module = TextModule(dtype=torch.float32)
    before = copy.deepcopy(module.model)
    cb = NEW_CALLBACKS[method]()
    scaler = overflowing_scaler()
    trainer(accelerator=DEVICE, deterministic=False, max_epochs=3, callbacks=[cb],
            plugins=[MixedPrecision("16-mixed", DEVICE, scaler=scaler)]).fit(module, loader(make_data(16)))
    assert cb.attacks == 12
    assert all(bool(torch.isfinite(p).all()) for p in module.model.parameters())
    assert float(max((p.detach().cpu() - q.detach().cpu()).abs().max() for p, q in zip(module.model.parameters(), before.parameters()))) > 0
    if method in ("sam", "asam"):
        assert cb.skipped >= 1  # the overflowing steps' attacks


@needs_cuda
@pytest.mark.parametrize("method", ["sam", "msam", "neftune"])
def test_new_methods_gpu_memory_does_not_grow(method: str) -> None:
    baseline = _growth([], "bf16-mixed", False)
    growth = _growth([NEW_CALLBACKS[method]()], "bf16-mixed", False)
    assert growth <= max(baseline, 0) + 16 * 1024, f"{method}: +{growth} B from step 20 to 120 (plain: +{baseline} B)"
