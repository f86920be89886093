"""models.threads: torch and numpy's BLAS get the same CPU thread count."""

from __future__ import annotations

import threadpoolctl
import torch

from models.threads import set_cpu_threads


def test_set_cpu_threads_limits_torch_and_blas() -> None:
    torch_before = torch.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=None):  # restores numpy's BLAS afterwards
        try:
            set_cpu_threads(1)
            assert torch.get_num_threads() == 1
            blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
            assert blas, "numpy should load a BLAS library"
            assert all(p["num_threads"] == 1 for p in blas)
            set_cpu_threads(0)  # leaves both as they are
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(torch_before)
