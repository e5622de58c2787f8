"""DDP on 2 CPU ranks (gloo): every rank identical, one all-reduce per step, equal to single-process accumulation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from ddp_script import callbacks_for, module_for, parse
from helpers import ManualText, TextModule, make_data, trainer

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD, BATCH = 2, 2

CONFIGS = [
    # name:method:adv_step:accumulate:precision:find_unused:manual
    "none:none:1:1:64-true:0:0",
    "fgm_k1:fgm:1:1:64-true:0:0",
    "fgm_k2_unused:fgm:1:2:64-true:1:0",
    "awp1_k1_unused:awp:1:1:64-true:1:0",
    "awp2_k2:awp:2:2:64-true:0:0",
    "awp2_k1_fp32_unused:awp:2:1:32-true:1:0",
    "fgm_k2_bf16:fgm:1:2:bf16-mixed:0:0",
    "awp2_k1_bf16_unused:awp:2:1:bf16-mixed:1:0",
    "manual_fgm:fgm:1:1:64-true:0:1",
    "manual_awp2_unused:awp:2:1:64-true:1:1",
    "pgd3_k2:pgd:3:2:64-true:0:0",
    "pgd2_k1_unused:pgd:2:1:64-true:1:0",
    "freelb2_k2:freelb:2:2:64-true:0:0",
    "freelb1_linf_k1_unused:freelb_linf:1:1:64-true:1:0",
    "manual_freelb2:freelb:2:1:64-true:0:1",
    "r3f_k2:r3f:1:2:64-true:0:0",
    "r3f_k1_unused:r3f:1:1:64-true:1:0",
    "smart_k1:smart:1:1:64-true:0:0",
    "smart2_k2_unused:smart:2:2:64-true:1:0",
    "sam_k2:sam:1:2:64-true:0:0",
    "asam_k1_unused:asam:1:1:64-true:1:0",
    "manual_sam:sam:1:1:64-true:0:1",
    "msam_k1:msam:1:1:64-true:0:0",
    "msam_k2_unused:msam:1:2:64-true:1:0",
    "neftune_k2:neftune:1:2:64-true:0:0",
    "vat_k2:vat:1:2:64-true:0:0",
]


def _launch(out, strategy, configs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_script.py"), str(out), strategy, *configs],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _launch(out, "ddp", CONFIGS)
    return {c.split(":")[0]: [torch.load(out / f"{c.split(':')[0]}_rank{r}.pt") for r in range(WORLD)] for c in CONFIGS}


def single_process_reference(cfg):
    """One process, accumulate_grad_batches = WORLD * k, over the micro-batches in DistributedSampler's order."""
    name, method, adv_step, acc, precision, _, manual = cfg.split(":")
    adv_step, acc, manual = int(adv_step), int(acc), manual == "1"
    ds = make_data(16)
    per_rank = [list(range(r, len(ds), WORLD)) for r in range(WORLD)]  # DistributedSampler, shuffle=False
    order = [i for s in range(len(per_rank[0]) // BATCH) for r in range(WORLD) for i in per_rank[r][s * BATCH:(s + 1) * BATCH]]
    data = DataLoader(Subset(ds, order), batch_size=BATCH, shuffle=False)
    dtype = torch.float64 if precision == "64-true" else torch.float32
    cbs = callbacks_for(parse(cfg))  # the callbacks the ranks ran
    module = module_for(parse(cfg), dtype, accumulate=WORLD)
    if manual:
        trainer(max_epochs=2, precision=precision, callbacks=cbs).fit(module, data)
    else:
        trainer(max_epochs=2, precision=precision, callbacks=cbs, accumulate_grad_batches=WORLD * acc).fit(module, data)
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_ranks_identical_and_equal_to_single_process_accumulation(ddp_results, cfg):
    name, method, _, acc, precision = cfg.split(":")[:5]
    ranks = ddp_results[name]
    steps = 2 * (16 // (WORLD * BATCH)) // int(acc)
    for r in ranks:
        assert len(r["weights"]) == steps
    for w0, w1 in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(w0, w1)  # every rank holds identical weights after every step
    expected = single_process_reference(cfg)
    tol = 1e-9 if precision == "64-true" else (1e-5 if precision == "32-true" else 2e-3)
    assert float((ranks[0]["weights"][-1] - expected).abs().max()) < tol
    if method != "none":
        assert ranks[0]["attacks"] == [2 * 16 // WORLD // BATCH]  # every micro-batch of this rank attacked


@pytest.mark.parametrize("cfg", CONFIGS)
def test_one_gradient_allreduce_per_optimizer_step(ddp_results, cfg):
    name = cfg.split(":")[0]
    baseline = ddp_results["none"][0]["allreduces"][1:]  # buckets per step without attack (1 for this model)
    counts = ddp_results[name][0]["allreduces"][1:]  # the first step also rebuilds buckets
    assert counts and set(counts) == set(baseline) == {1}


def test_ddp_spawn_reports_counters_and_adversarial_loss_on_rank_zero(tmp_path):
    _launch(tmp_path, "ddp_spawn", ["spawn_fgm:fgm:1:1:64-true:0:0"])
    main = torch.load(tmp_path / "spawn_fgm_main.pt")
    assert main["metrics"]["adv/fgm_attacks"] == 8.0
    assert main["metrics"]["adv/fgm_loss_epoch"] > 0


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.split(":")[1].startswith(("pgd", "freelb"))])
def test_pgd_and_freelb_change_ddp_training_and_log(ddp_results, cfg):
    name, method, _, acc = cfg.split(":")[:4]
    logged = "freelb" if method.startswith("freelb") else method
    for rank in ddp_results[name]:
        assert rank["metrics"][f"adv/{logged}_attacks"] == 2 * 16 // WORLD // BATCH
        assert rank["metrics"][f"adv/{logged}_skipped"] == 0
        assert rank["metrics"][f"adv/{logged}_loss_epoch"] > 0
    if acc == "1":  # against the run without attack (same schedule): the attack is not a no-op
        plain = ddp_results["none"][0]["weights"][-1]
        assert float((ddp_results[name][0]["weights"][-1] - plain).abs().max()) > 1e-4
