"""Shared fixtures: tiny random-weight CLIP models (no downloads), built once per session."""
from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network: the hub clients and our own probe see an offline machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MVPSEG_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
