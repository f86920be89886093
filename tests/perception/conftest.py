"""Data generated once for the perception tests (tiny LiDAR, a few frames)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from perception_helpers import generate


@pytest.fixture(scope="session")
def coop_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset root: ``train`` = random_traffic seed 1, 4 frames, 4 cavs; ``test`` = seed 2, 2 frames, 3 cavs."""
    root = tmp_path_factory.mktemp("coop_data")
    generate(root, "random_traffic", frames=4, seed=1, cavs=4, split="train")
    generate(root, "random_traffic", frames=2, seed=2, cavs=3, split="test")
    return root


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """spconv's CPU kernels and torch's thread pool oversubscribe small machines badly (seconds per
    convolution with two threads on two busy cores); one thread is faster and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
