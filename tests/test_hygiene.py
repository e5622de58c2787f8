"""The test suite itself: every test runs in a temporary folder and nothing lands in the repository (issue 21, 8)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from conftest import ROOT


def test_a_default_trainer_writes_its_checkpoints_into_tmp_path(tmp_path):
    assert os.getcwd() == str(tmp_path)
    before = set(os.listdir(ROOT))
    L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False).fit(BoringModel())
    assert os.listdir(tmp_path / "checkpoints") == ["epoch=0-step=1.ckpt"]  # default_root_dir is the working directory
    assert set(os.listdir(ROOT)) == before
