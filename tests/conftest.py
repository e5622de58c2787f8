import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", ".*does not have many workers.*")

# what the test session may leave in the repository root besides what was there: nothing (caches excepted)
_IGNORED = {"__pycache__", ".pytest_cache"}
_BEFORE: set = set()


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: a Trainer's default `checkpoints/` or `lightning_logs/` (relative
    to the working directory) lands there, not in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_leaked_global_seed(monkeypatch):
    """``seed_everything`` writes ``PL_GLOBAL_SEED`` into ``os.environ``, where it outlives the test: Lightning's DDP and
    FSDP strategies re-seed the global generator from it at setup (``reset_seed``) and the default strategy does not,
    so a later test comparing the two (or a script it launches, which inherits the environment) would draw other
    dropout masks under one strategy than under the other (seen in CI: FSDP 2.7e-3 away from the default strategy on
    the BERT with dropout). Every test starts without it and leaves the environment as it found it."""
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(name, raising=False)


def pytest_sessionstart(session):
    _BEFORE.update(os.listdir(ROOT))


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if a test wrote into the repository root (tests write only to temporary folders)."""
    left = sorted(set(os.listdir(ROOT)) - _BEFORE - _IGNORED)
    if left:
        sys.stderr.write(f"\nERROR: the tests left {', '.join(left)} in the repository root {ROOT}; tests must write "
                         "only to tmp_path (a Trainer without default_root_dir writes to the working directory).\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
