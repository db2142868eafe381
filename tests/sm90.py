"""Compile every Triton kernel launch the GPU code makes for an H100/H200 (sm_90), without a GPU.

:func:`record_launches` runs a function that calls kernel launchers (or a model's decode step) on tensors of
device "meta" (shapes, dtypes and strides, no data) that pass for CUDA tensors (``is_cuda``, on a device with the
132 SMs of an H100/H200), and records each ``kernel[grid](...)`` instead of running it: the kernel, its argument
types, its constexpr values and launch options, i.e. the tiles and warps the launcher picked for those shapes.
A read of a value on the host returns 0 (what the launchers read are range checks: 0 is "nothing out of range").
(Fake CUDA tensors would be closer, but a CPU-only torch cannot index or copy them.)

Run as a script (``conftest.assert_compiles_for_h100`` does it in a subprocess, because the test process imports
the kernels for the interpreter), this file compiles each distinct recorded launch read from stdin and prints,
per launch, as the last line of JSON:
  stack     local-memory bytes per thread (register spills), from cuobjdump
  shared    shared-memory bytes
  acq_rel   atomics with acquire-release semantics in the PTX (each orders memory; a sum needs none)
  unfenced  loads from a buffer that the same program stored to before, with no barrier between them (in TTIR
            order): other threads of the program may not see the stored values yet
Integer arguments are compiled as i32 (i64 beyond 2^31), 16-divisible ones with the divisibility hint and every
pointer as 16-byte aligned, as Triton specialises them at run time (it also folds an integer equal to 1; we do not).
"""
import importlib
import inspect
import json
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import torch

SMS = 132  # H100 SXM and H200
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


class _HostReadsZero(torch.utils._python_dispatch.TorchDispatchMode):
    """A read of a meta tensor's value on the host (``item``, ``bool``, ``int``) gives 0 instead of raising."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


def _launch(kernel, args: tuple, kwargs: dict) -> dict:
    """What Triton compiles for ``kernel(*args, **kwargs)``: a JSON-able record of one launch."""
    fn = kernel.fn
    params = inspect.signature(fn).parameters
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    signature, constants, divisible = {}, {}, []
    for name, value in bound.items():
        if "constexpr" in str(params[name].annotation) or value is None:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            if value.storage_offset() * value.element_size() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                divisible.append(name)
        else:
            signature[name] = "fp32"
    return {"kernel": f"{fn.__module__}:{fn.__name__}", "signature": signature, "constants": constants,
            "divisible": divisible, "options": options}


@contextmanager
def _recording(launches: list):
    from triton.runtime.jit import KernelInterface

    def launcher(kernel, grid):
        return lambda *args, **kwargs: launches.append(_launch(kernel, args, dict(kwargs)))

    is_cuda = torch._C.TensorBase.is_cuda
    props = SimpleNamespace(multi_processor_count=SMS, name="H200 (recorded on CPU)")
    with mock.patch.object(KernelInterface, "__getitem__", launcher), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props), \
            mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: t.is_meta or is_cuda.__get__(t))), \
            _HostReadsZero():
        yield


def record_launches(fn) -> list[dict]:
    """The distinct kernel launches that ``fn()`` makes on tensors of device "meta" (see the module docstring)."""
    launches = []
    with _recording(launches):
        fn()
    unique = {json.dumps(launch, sort_keys=True, default=str): launch for launch in launches}
    return list(unique.values())


_DEF = re.compile(r"^\s*(%[\w.#]+) = tt\.\w+ (%[\w.#]+)")


def _unfenced_loads(ttir: str) -> int:
    """Loads from a buffer that this program stored to earlier (in TTIR text order) with no barrier between.
    A buffer is the kernel argument a pointer derives from (through addptr, splat, broadcast...)."""
    root, stored, count = {}, set(), 0
    for line in ttir.splitlines():
        if m := _DEF.match(line):  # %x = tt.op %y, ...: %x derives from %y's buffer
            root[m.group(1)] = root.get(m.group(2), m.group(2))
        if re.search(r"\b(?:gpu|ttg)\.barrier\b", line):
            stored.clear()
        elif m := re.search(r"\btt\.store (%[\w.#]+)", line):
            stored.add(root.get(m.group(1), m.group(1)))
        elif (m := re.search(r"\btt\.load (%[\w.#]+)", line)) and root.get(m.group(1), m.group(1)) in stored:
            count += 1
    return count


def compile_launch(launch: dict, cuobjdump: str) -> dict:
    """Compile one recorded launch for sm_90 and read its resource usage (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = launch["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    names = list(launch["signature"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in launch["divisible"]}
    source = ASTSource(kernel, launch["signature"], launch["constants"], attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {"stack": int(re.search(r"STACK:(\d+)", dump).group(1)), "shared": compiled.metadata.shared,
            "acq_rel": len(re.findall(r"\b(?:atom|red)\.[\w.]*acq_rel", compiled.asm["ptx"])),
            "unfenced": _unfenced_loads(compiled.asm["ttir"])}


def describe(launch: dict) -> str:
    """A short name for a launch in test failures: kernel, pointer types, constexprs and options."""
    ptrs = ",".join(t for t in launch["signature"].values() if t.startswith("*"))
    consts = ",".join(f"{k}={v}" for k, v in launch["constants"].items() if v is not None)
    return f"{launch['kernel']}({ptrs}; {consts}; {launch['options']})"


def _compile_or_error(launch: dict, cuobjdump: str) -> dict:
    try:
        return compile_launch(launch, cuobjdump)
    except Exception as e:  # reported with the launch that failed, the others still compile
        return {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}


if __name__ == "__main__":  # python -m tests.sm90 CUOBJDUMP < launches.json
    print(json.dumps([_compile_or_error(launch, sys.argv[1]) for launch in json.load(sys.stdin)]))
