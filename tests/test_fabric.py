"""lightning_adv.fabric.adversarial_backward: a Fabric loop equals the plain loop (float64), trains under bf16-mixed,
and under Fabric DDP (2 gloo ranks) keeps the ranks identical with one all-reduce per optimizer step."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from fabric_ddp_script import BATCH, EPOCHS, LR, WORLD, build_methods, flat, loss_of, make_net, rank_batches
from helpers import TextModule, reference_fit
from lightning_adv import FGM, FGMCallback, fabric_adversarial_backward
from lightning_adv.core import adversarial_backward as plain_adversarial_backward
from lightning_adv.fabric import adversarial_backward

HERE = os.path.dirname(os.path.abspath(__file__))
FGM_KW = dict(epsilon=0.7, emb_name="word_embeddings")
AWP_KW = dict(adv_param="weight", adv_lr=0.5, adv_eps=0.05, adv_step=2)
SP_EPOCHS = 1  # single process: one epoch of 8 micro-batches, 4 optimizer steps with k=2, is enough


@pytest.fixture
def float64_default():
    """Fabric's "64-true" casts the module's outputs to the default dtype (float32 unless set): for a loss in float64
    like the plain loop's, make float64 the default dtype while the test runs."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def fabric_of(precision: str = "64-true") -> Fabric:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Fabric(accelerator="cpu", devices=1, precision=precision)


def micro_batches(n: int = 8) -> list:
    """The 16 samples in micro-batches of 2 (one "rank" holding everything)."""
    return rank_batches(0, world=1)[:n]


def fabric_fit(spec, *, k=2, precision="64-true", dtype=torch.float64, on_module=False, freelb_init=0.1, epochs=SP_EPOCHS, n=8):
    """Train with Fabric and the engine; gradient accumulation ``k`` through ``fabric.no_backward_sync``."""
    fabric = fabric_of(precision)
    net = make_net(dtype)
    model, optimizer = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=LR))
    torch.manual_seed(1)  # FreeLB's random start
    methods = build_methods(spec, model.module if on_module else model, freelb_init=freelb_init, unwrap_freelb=False)
    losses, outcomes = [], []
    for _ in range(epochs):
        for i, (ids, y) in enumerate(micro_batches(n)):
            stepping = (i + 1) % k == 0
            with fabric.no_backward_sync(model, enabled=not stepping):
                loss, out = adversarial_backward(fabric, model, methods, lambda: loss_of(model, ids, y, k, methods))
            losses.append(loss)
            outcomes.append(out)
            if stepping:
                optimizer.step()
                optimizer.zero_grad()
    return net, losses, outcomes


def plain_fit(spec, *, k=2, dtype=torch.float64, autocast=None, freelb_init=0.1, epochs=SP_EPOCHS, float_logits=False, n=8):
    """The same training in a plain loop with lightning_adv.core.adversarial_backward, without Fabric (with
    ``float_logits``, the logits cast to float32 as Fabric does to the outputs under a float32 default dtype)."""
    net = make_net(dtype)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR)
    torch.manual_seed(1)
    methods = build_methods(spec, net, freelb_init=freelb_init)
    for _ in range(epochs):
        for i, (ids, y) in enumerate(micro_batches(n)):
            def loss_fn():
                ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
                with ctx:
                    logits = net(ids)
                loss = nn.functional.cross_entropy(logits.float() if autocast or float_logits else logits, y) / k
                return {"loss": loss, "logits": logits} if any(m.needs_logits for m in methods) else loss

            plain_adversarial_backward(net, methods, loss_fn)
            if (i + 1) % k == 0:
                optimizer.step()
                optimizer.zero_grad()
    return net


def diff(a: nn.Module, b: nn.Module) -> float:
    return float((flat(a) - flat(b)).abs().max())


# -- float64: the Fabric loop is the plain loop ------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["fgm", "awp", "pgd", "freelb", "fgm+awp", "vat", "sam", "sam+fgm", "none"])
def test_float64_fabric_equals_plain_loop(float64_default, spec):
    net, losses, outcomes = fabric_fit(spec)
    expected = plain_fit(spec)
    assert diff(net, expected) < 1e-12
    n = len(spec.split("+")) if spec != "none" else 0
    assert len(outcomes) == SP_EPOCHS * 8 and all(len(o) == n for o in outcomes)
    assert all(not bool(o.skipped) and o.loss is not None for out in outcomes for o in out)
    assert all(not loss.requires_grad and loss.dtype == torch.float64 for loss in losses)


@pytest.mark.parametrize("method,kwargs", [("fgm", FGM_KW), ("awp", AWP_KW)])
def test_float64_fabric_equals_reference_snippets(float64_default, method, kwargs):
    net, _, _ = fabric_fit(method)
    reference = TextModule(dtype=torch.float64)  # same seed, same initial weights, AdamW(lr=0.05)
    assert diff(reference.model, make_net()) == 0.0 and reference.lr == LR
    reference_fit(reference, micro_batches(), epochs=SP_EPOCHS, method=method, kwargs=kwargs, accumulate=2)
    assert diff(net, reference.model) < 1e-10


def test_float64_model_with_float32_outputs_equals_plain_loop_on_float32_logits():
    """Without a float64 default dtype, Fabric's "64-true" hands back float32 logits: every pass sees them."""
    net, losses, _ = fabric_fit("fgm")
    assert losses[0].dtype == torch.float32
    assert diff(net, plain_fit("fgm", float_logits=True)) < 1e-12


def test_attack_is_not_a_no_op():
    attacked, _, _ = fabric_fit("fgm")
    assert diff(attacked, plain_fit("none")) > 1e-4


@pytest.mark.parametrize("spec", ["fgm", "freelb"])
def test_methods_built_on_fabric_module_or_user_module_agree(float64_default, spec):
    on_fabric, _, _ = fabric_fit(spec, k=1)
    on_module, _, _ = fabric_fit(spec, k=1, on_module=True)
    assert diff(on_fabric, on_module) == 0.0


def test_accumulated_gradient_is_kept_and_single_method_accepted(float64_default):
    """Gradients already in .grad are added to (what no_backward_sync accumulation needs); a lone Method is a list."""
    fabric = fabric_of()
    net = make_net()
    model = fabric.setup_module(net)
    (ids, y), = micro_batches(1)
    loss_fn = lambda: nn.functional.cross_entropy(model(ids), y)  # noqa: E731
    fgm = FGM(model, **FGM_KW)
    adversarial_backward(fabric, model, fgm, loss_fn)
    once = [p.grad.clone() for p in net.parameters()]
    adversarial_backward(fabric, model, [fgm], loss_fn)
    assert all(torch.allclose(p.grad, 2 * g, rtol=0, atol=1e-14) for p, g in zip(net.parameters(), once))


# -- bf16-mixed ----------------------------------------------------------------------------------------------------
def test_bf16_mixed_trains_and_matches_autocast_plain_loop():
    spec = "fgm+awp+freelb"
    net, losses, outcomes = fabric_fit(spec, precision="bf16-mixed", dtype=torch.float32, freelb_init=0.0, n=4)
    start = make_net(torch.float32)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert diff(net, start) > 1e-3  # the weights moved
    assert all(torch.isfinite(loss) for loss in losses)
    attacks = [sum(1 for out in outcomes if out[j].loss is not None) for j in range(3)]
    skipped = [sum(int(out[j].skipped) for out in outcomes) for j in range(3)]
    assert attacks == [4] * 3 and skipped == [0, 0, 0]
    assert all(torch.isfinite(o.loss) for out in outcomes for o in out)
    # the autocast happened (Fabric's precision), and it is the plain loop under torch.autocast(bfloat16)
    expected = plain_fit(spec, dtype=torch.float32, autocast=torch.bfloat16, freelb_init=0.0, n=4)
    fp32 = plain_fit(spec, dtype=torch.float32, freelb_init=0.0, n=4)
    assert diff(net, expected) < 1e-5 < diff(net, fp32)


# -- errors --------------------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    fabric = fabric_of()
    net = make_net()
    model = fabric.setup_module(net)
    (ids, y), = micro_batches(1)
    loss_fn = lambda: nn.functional.cross_entropy(model(ids), y)  # noqa: E731
    with pytest.raises(TypeError, match=r"methods\[1\] is a FGMCallback, not a lightning_adv method"):
        adversarial_backward(fabric, model, [FGM(model, **FGM_KW), FGMCallback()], loss_fn)
    with pytest.raises(TypeError, match="methods must be a list"):
        adversarial_backward(fabric, model, "fgm", loss_fn)
    with pytest.raises(TypeError, match=r"returned by fabric.setup"):
        adversarial_backward(fabric, net, [FGM(net, **FGM_KW)], loss_fn)
    with pytest.raises(TypeError, match="Fabric object"):
        adversarial_backward(model, model, [], loss_fn)
    class FSDPStrategy:  # refused by name, as the callbacks refuse sharding strategies
        pass

    with pytest.raises(ValueError, match="does not support the strategy FSDPStrategy"):
        adversarial_backward(type("F", (), {"backward": print, "strategy": FSDPStrategy()})(), model, [], loss_fn)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        adversarial_backward(fabric, model, [], loss_fn())
    with pytest.raises(ValueError, match=r"methods\[0\] \(FGM\) perturbs embeddings.word_embeddings.weight"):
        adversarial_backward(fabric, model, [FGM(make_net(), **FGM_KW)], loss_fn)
    with pytest.raises(ValueError, match="returned None"):
        adversarial_backward(fabric, model, [FGM(model, **FGM_KW)], lambda: None)
    assert all(p.grad is None for p in net.parameters())  # nothing was backpropagated by the failed calls
    before, calls = flat(net), []

    def failing():  # the clean pass works, the adversarial one raises
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return loss_fn()

    with pytest.raises(RuntimeError, match="boom"):
        adversarial_backward(fabric, model, [FGM(model, **FGM_KW)], failing)
    assert torch.equal(flat(net), before)  # the perturbed embedding was restored


def test_exports():
    assert fabric_adversarial_backward is adversarial_backward


# -- DDP: 2 gloo ranks ---------------------------------------------------------------------------------------------
DDP_CONFIGS = ["none:2", "fgm:2", "freelb:2", "fgm+awp:2", "pgd:2", "awp:1", "r3f:2"]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fabric_ddp")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fabric_ddp_script.py"), str(out), *DDP_CONFIGS],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    def name(cfg):
        return cfg.replace(":", "_").replace("+", "-")

    return {cfg: [torch.load(out / f"{name(cfg)}_rank{r}.pt") for r in range(WORLD)] for cfg in DDP_CONFIGS}


def single_process_reference(spec: str, k: int) -> torch.Tensor:
    """One process, the WORLD * k micro-batches of each optimizer step accumulated (each attacked from its own
    clean gradient, R3F's noise from its rank's generator), the loss divided by k as on the ranks and every backward
    by WORLD: DDP's mean of the ranks' accumulated gradients."""
    net = make_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR)
    methods = [build_methods(spec, net, rank=r) for r in range(WORLD)]
    per_rank = [rank_batches(r) for r in range(WORLD)]
    for _ in range(EPOCHS):
        for s in range(0, len(per_rank[0]), k):
            for r in range(WORLD):
                for ids, y in per_rank[r][s:s + k]:
                    plain_adversarial_backward(net, methods[r], lambda: loss_of(net, ids, y, k, methods[r]),
                                               backward=lambda loss: (loss / WORLD).backward())
            optimizer.step()
            optimizer.zero_grad()
    return flat(net)


@pytest.mark.parametrize("cfg", DDP_CONFIGS)
def test_ddp_ranks_identical_and_equal_to_single_process(float64_default, ddp_results, cfg):  # as the ranks ran
    spec, k = cfg.split(":")[0], int(cfg.split(":")[1])
    ranks = ddp_results[cfg]
    steps = EPOCHS * (16 // (WORLD * BATCH)) // k
    assert [len(r["weights"]) for r in ranks] == [steps, steps]
    for w0, w1 in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(w0, w1)
    expected = single_process_reference(spec, k)
    assert float((ranks[0]["weights"][-1] - expected).abs().max()) < 1e-9
    n = 0 if spec == "none" else len(spec.split("+"))
    for r in ranks:
        assert r["attacks"] == [EPOCHS * 16 // WORLD // BATCH] * n and r["skipped"] == [0] * n
    if spec != "none" and k == 2:  # the attack is not a no-op under DDP either
        assert float((ranks[0]["weights"][-1] - ddp_results["none:2"][0]["weights"][-1]).abs().max()) > 1e-4


@pytest.mark.parametrize("cfg", DDP_CONFIGS)
def test_ddp_one_allreduce_per_optimizer_step(ddp_results, cfg):
    """Exactly one backward pass per optimizer step all-reduces: the last one of the stepping micro-batch."""
    for rank in ddp_results[cfg]:
        for step in rank["steps"]:
            assert step["reduced"] == [step["backwards"][-1]], step
            assert step["buckets"] == 1  # this model fits one bucket
        passes = 1 + sum({"fgm": 1, "awp": 2, "pgd": 2, "freelb": 2, "r3f": 1}.get(m, 0) for m in cfg.split(":")[0].split("+"))
        k = int(cfg.split(":")[1])
        assert all(len(step["backwards"]) == passes * k for step in rank["steps"])
