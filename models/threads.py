"""CPU thread counts for torch and for the BLAS library under numpy, set together.

Why both: numpy's OpenBLAS starts one thread per core and busy-waits between calls. With torch
pinned to one thread on a small, busy machine those threads fight everything else: on 2 cores
with two other jobs running, ``np.linalg.inv`` of a 3 x 3 matrix took about 1 ms (8 us with one
BLAS thread), and the BEV warps of five-agent CORE fusion (two such inverses each) went from a few
milliseconds to tens. ``threadpoolctl`` (the library scikit-learn uses for this) sets the limit in
the running process, whatever BLAS numpy was built with; data-loader workers forked afterwards
inherit it.
"""

from __future__ import annotations

import threadpoolctl
import torch

__all__ = ["set_cpu_threads"]


def set_cpu_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch and in numpy's BLAS; 0 or less leaves both as they are."""
    if threads <= 0:
        return
    torch.set_num_threads(threads)
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
