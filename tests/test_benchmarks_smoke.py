"""Smoke test of ``benchmarks/attack_cost.py``: its ``--quick`` mode on a tiny BERT."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "attack_cost.py")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run in a subprocess (it sets threads and logging levels), its Markdown and JSON."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench")
    md, js = out / "attack_cost.md", out / "attack_cost.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--out", str(md), "--json", str(js)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return md.read_text(), json.loads(js.read_text())


def test_quick_benchmark_writes_the_table(quick_run):
    text, results = quick_run
    rows = [line for line in text.splitlines() if line.startswith("| tiny (")]
    assert len(rows) == 2
    assert "| FGM |" in rows[0] and "| AWP (adv_step=1) |" in rows[1]
    assert "X = (T_attack − T_plain) / T_fwd+bwd" in text
    assert "Machine:" in text and "torch" in text and "cores" in text
    assert "Not measured: this run is on the CPU" in text or "ours under" in text
    (res,) = results["models"]
    assert results["args"]["clock"] == "cpu"  # --quick: one thread, process CPU time
    for clock in ("cpu", "wall"):
        for method in ("fgm", "awp"):
            for key in ("ref", "ours", "ours_minus_ref", "lightning", "lightning_minus_loop"):
                x = res["X"][clock][method][key]
                assert math.isfinite(x["value"]) and x["lo"] <= x["hi"]
        assert all(ms > 0 for ms in res["median_ms"][clock].values())
    assert all(ms > 0 for ms in res["arithmetic_ms"].values())
    for variant in ("L_fgm", "L_awp"):
        bd = res["breakdown_ms"][variant]
        assert bd["hooks"] >= bd["attack"] > 0 and bd["forward"] > 0 and bd["autograd"] > 0


def test_quick_benchmark_saved_state(quick_run):
    _, results = quick_run
    saved = results["models"][0]["saved"]
    # ours: at most one copy of the perturbed parameters; the reference AWP keeps three (backup and two bounds)
    assert 0 < saved["fgm"]["ours"] <= saved["fgm"]["perturbed"]
    assert 0 < saved["awp"]["ours"] <= saved["awp"]["perturbed"]
    assert saved["fgm"]["ref"] == saved["fgm"]["perturbed"]
    assert saved["awp"]["ref"] == 3 * saved["awp"]["perturbed"]
