"""Triton kernels, each beside the plain PyTorch reference that defines it.

One switch decides which path runs: the Triton kernel on CUDA tensors when Triton imports, the
PyTorch reference everywhere else (CPU, or ``NANOTORL_KERNELS=torch`` to force the reference on GPU
for debugging and A/B comparisons). Tests call the Triton launchers directly on CPU tensors under
``TRITON_INTERPRET=1``.
"""
import os

import torch

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    HAVE_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernel should serve a call on tensor ``t``."""
    if os.environ.get("NANOTORL_KERNELS", "triton") == "torch" or not HAVE_TRITON:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
