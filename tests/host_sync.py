"""``no_host_sync()``: fail on any operation that would make the host wait for the device, seen on CPU.

Inside a CUDA-graph capture such an operation fails the capture (and outside one it stalls the GPU's queue). On
CPU nothing waits, so the operations are caught by what they are, at PyTorch's dispatcher and Python API:
  * ops whose result is a host value or whose output shape depends on the data (PyTorch tags them
    ``data_dependent_output`` / ``dynamic_output_shape``): ``item``, ``bool(t)``, ``int(t)``, ``nonzero``,
    ``masked_select``, ``unique``, ``equal``, ``repeat_interleave`` with tensor repeats, ``one_hot`` without
    a class count...;
  * indexing with a boolean mask (``x[mask]``, ``x[mask] = v``), which runs ``nonzero`` inside the index op;
  * ``Tensor.tolist`` and ``Tensor.numpy``, which copy to the host, and tensors made from host data
    (``torch.tensor(...)``, a number put in with ``x[i] = v``), copied from it.
Advanced indexing with integer tensors is fine (no sync), so ``index`` is checked for masks only. A Triton
kernel launch never syncs on a GPU; under the CPU interpreter it reads its arguments on the host, so launches
are let through unchecked.
"""
from contextlib import contextmanager
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
              torch.ops.aten._index_put_impl_.default}
_FROM_HOST = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}
_HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy}


class HostSyncError(RuntimeError):
    pass


class _Checker(TorchDispatchMode):
    paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            if func in _INDEX_OPS:
                if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                    raise HostSyncError(f"{func}: indexing with a boolean mask calls nonzero, which waits for the "
                                        "device; use torch.where, masked_fill or a scatter with a fixed shape")
            elif func in _FROM_HOST:
                raise HostSyncError(f"{func}: a tensor made from host data (torch.tensor(...), or a number put in "
                                    "with x[i] = v) is copied to the device from pageable memory: a capture refuses "
                                    "that copy (or freezes the value into the graph); keep such tensors on the device")
            elif any(tag in func.tags for tag in _SYNC_TAGS):
                raise HostSyncError(f"{func}: its result is read on the host or its shape depends on the data, so "
                                    "the host waits for the device; keep the value on the device (torch.where, "
                                    "fixed shapes)")
        return func(*args, **(kwargs or {}))


class _HostCopies(TorchFunctionMode):
    def __init__(self, checker):
        super().__init__()
        self.checker = checker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_COPIES and not self.checker.paused:
            raise HostSyncError(f"Tensor.{func.__name__} copies to the host, which waits for the device")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_sync():
    """Raise ``HostSyncError`` on any operation inside the block that would wait for the device (see above)."""
    from triton.runtime.jit import KernelInterface

    checker = _Checker()
    launch = KernelInterface.__getitem__

    def unchecked(kernel, grid):
        def run(*args, **kwargs):
            checker.paused = True
            try:
                return launch(kernel, grid)(*args, **kwargs)
            finally:
                checker.paused = False
        return run

    with mock.patch.object(KernelInterface, "__getitem__", unchecked), checker, _HostCopies(checker):
        yield
