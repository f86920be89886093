"""Make spconv's sparse convolutions correct on CPU tensors, forward and backward.

The CPU build of spconv (the ``spconv`` wheel, 2.3.8 here, as opposed to ``spconv-cu*``) runs
sparse convolutions on CPU tensors through ``spconv.pytorch.ops``' gather-GEMM-scatter path. Two
things break there:

1. **Backward needs CUDA.** ``indice_conv_backward`` asks ``get_current_stream()`` for the CUDA
   stream before it branches on the device. That function is
   ``torch.cuda.current_stream().cuda_stream``, so without CUDA the backward pass stops with
   "Torch not compiled with CUDA enabled". The CPU code never uses the stream, and spconv's own
   CPU branches pass 0 for it, so answering 0 when CUDA is absent is the fix.
2. **The CPU scatter-add races.** ``SpconvOps.scatter_add_cpu`` (used after every GEMM, forward
   and input-gradient) runs an OpenMP loop whose row pointers are shared between threads, so with
   more than one thread rows are added to the wrong outputs: silently wrong features and input
   gradients, differently from run to run, once a kernel offset has a few thousand active pairs
   (real scans do; a few hundred random voxels do not). The fix replaces it with torch's
   ``index_add_`` on the same memory (spconv's CPU tensors are views that numpy can share).

3. **A CUDA build on CPU tensors.** The CUDA wheels (``spconv-cu*``) give every layer the
   implicit-GEMM algorithm by default, which exists on CUDA only: CPU tensors (evaluation or a
   latency benchmark on CPU, the CPU half of a CPU-vs-GPU check) stop with "implicit gemm only
   support cuda". The fix runs a layer whose input is on CPU with ``ConvAlgo.Native``, the only
   CPU algorithm; weights are KRSC for every algorithm in spconv 2.3, so the same weights serve
   both, and layers that share an indice key switch together. CUDA inputs keep the layer's own
   algorithm.

With all three, forward and backward match a dense ``torch.nn.Conv3d`` (tests/models/test_spconv_cpu.py).

Model modules that use spconv do, next to their imports::

    from models.spconv_cpu import enable_cpu_backward

    enable_cpu_backward()

Importing this module changes nothing; only the call does. The call is idempotent. The stream
fix is skipped where CUDA is available or where the installed spconv's function works without
it; the scatter-add fix is applied whenever spconv has that kernel, since the replacement is
correct for any CPU tensor; the algorithm fix is applied on every build (on the CPU-only build
every layer is already native, so it changes nothing there).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["SpconvCpuFixes", "cpu_fixes_applied", "enable_cpu_backward"]

# Where spconv 2.3.8 defines get_current_stream, and the modules that bind it by name with
# ``from spconv.pytorch.cppcore import ... get_current_stream`` on the float path. The quantization
# modules bind it too: they are patched if already imported, and otherwise pick up the
# replacement from cppcore when they are imported.
_DEFINING_MODULE = "spconv.pytorch.cppcore"
_IMPORTING_MODULES = ("spconv.pytorch.ops", "spconv.pytorch.hash", "spconv.pytorch.utils")
_SPCONV_OPS_MODULE = "spconv.core_cc.csrc.sparse.all"

# Set on the replacements so that later calls recognise them.
_PATCH_MARK = "_coopstack_cpu_fix"


@dataclass(frozen=True)
class SpconvCpuFixes:
    """Which replacements are in place after :func:`enable_cpu_backward`."""

    stream_zero_without_cuda: bool
    """``get_current_stream`` answers 0 without CUDA (False: not needed here)."""
    serial_scatter_add: bool
    """``SpconvOps.scatter_add_cpu`` is the race-free version (False: spconv has no such kernel)."""
    native_on_cpu: bool = False
    """Sparse convolutions run with ``ConvAlgo.Native`` on CPU inputs."""


def _is_spconv_module(name: str, module: ModuleType | None) -> bool:
    return module is not None and (name == "spconv" or name.startswith("spconv."))


def _make_stream_replacement(original: Callable[[], int]) -> Callable[[], int]:
    import torch

    @functools.wraps(original)
    def get_current_stream() -> int:
        """spconv's current CUDA stream, or 0 (spconv's "no stream" for CPU work) without CUDA."""
        if torch.cuda.is_available():
            return original()
        return 0

    setattr(get_current_stream, _PATCH_MARK, True)
    return get_current_stream


def _fix_stream() -> bool:
    import torch

    cppcore = importlib.import_module(_DEFINING_MODULE)
    for name in _IMPORTING_MODULES:
        importlib.import_module(name)
    current = cppcore.get_current_stream

    if getattr(current, _PATCH_MARK, False):
        original, replacement = current.__wrapped__, current
    else:
        if torch.cuda.is_available():
            return False  # spconv's function returns a real stream
        try:
            current()
        except (AssertionError, RuntimeError):  # "Torch not compiled with CUDA enabled" and kin
            pass
        else:
            return False  # this spconv already copes without CUDA
        original, replacement = current, _make_stream_replacement(current)

    for name, module in list(sys.modules.items()):
        if _is_spconv_module(name, module) and getattr(module, "get_current_stream", None) is original:
            module.get_current_stream = replacement
    return True


def _make_scatter_add_replacement(original: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    def scatter_add_cpu(out: Any, inp: Any, inds: Any) -> None:
        """``out[inds[i]] += inp[i]`` for ``i < len(inds)``, on spconv (tensorview) CPU tensors.

        out: (N_out, C), inp: (>= len(inds), C) of the same dtype, inds: (nhot,) int32.
        """
        try:
            out_np, inp_np, inds_np = out.numpy_view(), inp.numpy_view(), inds.numpy_view()
        except (RuntimeError, TypeError, ValueError):  # a dtype numpy cannot view (bfloat16)
            return original(out, inp, inds)
        nhot = inds_np.shape[0]
        torch.from_numpy(out_np).index_add_(
            0, torch.from_numpy(inds_np).long(), torch.from_numpy(inp_np[:nhot])
        )

    scatter_add_cpu.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(scatter_add_cpu, _PATCH_MARK, True)
    return staticmethod(scatter_add_cpu)  # type: ignore[return-value]


def _fix_scatter_add() -> bool:
    spconv_ops = importlib.import_module(_SPCONV_OPS_MODULE).SpconvOps
    current = getattr(spconv_ops, "scatter_add_cpu", None)
    if current is None:
        return False
    if not getattr(current, _PATCH_MARK, False):
        spconv_ops.scatter_add_cpu = _make_scatter_add_replacement(current)
    return True


def _make_native_on_cpu_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    from spconv.core import ConvAlgo

    @functools.wraps(original)
    def forward(self: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        """spconv's forward, with ``ConvAlgo.Native`` while the input is on CPU."""
        if self.algo == ConvAlgo.Native or input.features.is_cuda:
            return original(self, input, *args, **kwargs)
        algo = self.algo
        self.algo = ConvAlgo.Native
        try:
            return original(self, input, *args, **kwargs)
        finally:
            self.algo = algo

    setattr(forward, _PATCH_MARK, True)
    return forward


def _fix_algorithm_on_cpu() -> bool:
    from spconv.pytorch.conv import SparseConvolution

    if not getattr(SparseConvolution.forward, _PATCH_MARK, False):
        SparseConvolution.forward = _make_native_on_cpu_forward(SparseConvolution.forward)
    return True


def enable_cpu_backward() -> SpconvCpuFixes:
    """Apply the CPU fixes described in the module docstring; safe to call any number of times.

    The stream replacement goes into ``spconv.pytorch.cppcore`` (so modules imported later get it)
    and into every loaded spconv module that bound ``get_current_stream`` by name; a later call
    also covers spconv modules imported since the last one. The scatter-add replacement goes onto
    the ``SpconvOps`` class, which every caller shares, and the algorithm choice onto
    ``SparseConvolution.forward``, which every sparse convolution layer inherits.
    """
    return SpconvCpuFixes(
        stream_zero_without_cuda=_fix_stream(),
        serial_scatter_add=_fix_scatter_add(),
        native_on_cpu=_fix_algorithm_on_cpu(),
    )


def cpu_fixes_applied() -> SpconvCpuFixes:
    """What is in place now, without changing anything."""
    bound = [
        module.get_current_stream
        for name, module in list(sys.modules.items())
        if _is_spconv_module(name, module) and hasattr(module, "get_current_stream")
    ]
    spconv_all = sys.modules.get(_SPCONV_OPS_MODULE)
    scatter = getattr(getattr(spconv_all, "SpconvOps", None), "scatter_add_cpu", None)
    conv = getattr(sys.modules.get("spconv.pytorch.conv"), "SparseConvolution", None)
    return SpconvCpuFixes(
        stream_zero_without_cuda=bool(bound) and all(getattr(fn, _PATCH_MARK, False) for fn in bound),
        serial_scatter_add=bool(getattr(scatter, _PATCH_MARK, False)),
        native_on_cpu=bool(getattr(getattr(conv, "forward", None), _PATCH_MARK, False)),
    )


@contextlib.contextmanager
def spconv_native_state_dict_loading() -> Iterator[None]:
    """Load spconv weights with spconv's own layout handling, even after mmdet3d was imported.

    Importing ``mmdet3d.models`` calls mmdet3d's ``register_spconv2()``, which replaces
    ``SparseModule._load_from_state_dict`` for the whole process with a loader that permutes every
    sparse-conv weight from mmcv's layout. Checkpoints written by spconv itself (ours) then fail to
    load with a shape mismatch. Inside this context the replacement is lifted, and restored after.
    """
    from spconv.pytorch.modules import SparseModule

    patched = SparseModule.__dict__.get("_load_from_state_dict")
    if patched is None or "mmdet3d" not in getattr(patched, "__module__", ""):
        yield
        return
    del SparseModule._load_from_state_dict
    try:
        yield
    finally:
        SparseModule._load_from_state_dict = patched
