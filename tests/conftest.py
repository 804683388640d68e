"""Shared fixtures: tiny random-weight CLIP models (no downloads), built once per session."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

# Tests never touch the network: the hub clients and our own probe see an offline machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MVPSEG_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Whatever the run writes outside ``tmp_path`` goes to one scratch folder, removed when the session ends: Gradio's
# cache, gradio_client's downloads (each leaves an empty ``<tmp>/<40 hex>`` folder behind), torchrun's rendezvous
# files, and the same from the servers and trainers the tests start (they inherit TMPDIR). CI runs on machines
# whose disk is shared with other work; a test run must leave nothing there (it used to leave ~130 folders). This
# happens before any test module imports gradio, which reads GRADIO_TEMP_DIR at import. pytest's own ``tmp_path``
# folders stay in the system temp folder (PYTEST_DEBUG_TEMPROOT), so a failed test's files are still there to read.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
_SCRATCH = tempfile.mkdtemp(prefix="mvpseg-tests-")
os.environ["TMPDIR"] = tempfile.tempdir = _SCRATCH
os.environ["GRADIO_TEMP_DIR"] = os.path.join(_SCRATCH, "gradio")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_unconfigure(config):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    """A deterministic tiny CLIP: ModifiedResNet [1,1,1,1] width 16, text width 64, context 48, embed 64."""
    from mvpseg.testing import tiny_clip

    return tiny_clip(seed=0)


@pytest.fixture()
def one_thread():
    """One torch thread for the test (training runs: deterministic and kind to a shared 2-core machine); the
    previous count is restored afterwards. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
