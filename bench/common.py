"""What every benchmark shares: timing, peak memory and a JSON record (tables: nanotorl.metrics.print_table)."""
import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def kernel_args(doc: str, *switches: tuple[str, str]) -> argparse.Namespace:
    """The kernel benchmarks' command line: ``--quick`` for fewer shapes and iterations, and more on/off
    ``switches`` given as (flag, help)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    for flag, help_text in switches:
        parser.add_argument(flag, action="store_true", help=help_text)
    return parser.parse_args()


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors allocated while active (``with LiveTensorBytes() as m: ...; m.peak``): the CPU
    counterpart of ``torch.cuda.max_memory_allocated``, which the CPU allocator lacks.

    Every op's outputs whose storage is new (not one of its inputs', so views and in-place results are not counted
    twice) are counted until their storage is freed; tensors that existed before do not count. Scratch memory an
    op frees before returning is not seen: it is a lower bound on what the process allocates, exact for what
    PyTorch code keeps (logits, masks, saved activations). Slows every op down: measure time separately.
    """

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.live = {key: ref for key, ref in self.live.items() if not ref[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def measure(fn, warmup: int = 2, iters: int = 10, device: str = "cpu", cpu_memory: bool = False) -> dict:
    """Median wall time of ``fn()`` in seconds and the peak memory it allocated: CUDA's counters, or on CPU with
    ``cpu_memory`` one more call under :class:`LiveTensorBytes` (NaN otherwise)."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
    if cpu_memory and not cuda:
        with LiveTensorBytes() as live:
            fn()
        peak = live.peak
    return {"time_s": statistics.median(times), "peak_mem_bytes": peak}


def copy_bandwidth(device: str, iters: int = 10) -> float:
    """Bytes per second of a device copy (read + write) of 1 GiB (64 MiB on CPU): the memory roofline."""
    x = torch.empty((1 << 30) if device == "cuda" else (1 << 26), dtype=torch.uint8, device=device)
    t = measure(lambda: x.clone(), iters=iters, device=device)["time_s"]
    return 2 * x.numel() / t


def environment() -> dict:
    """Date, device and versions, stored beside every result."""
    env = {"date": date.today().isoformat(), "python": sys.version.split()[0],
           "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return env


def save_result(name: str, rows: list[dict], tag: str = "") -> Path:
    """Write ``rows`` with the environment to <results>/<name>_<device>_<date><tag>.json, for the record; the folder
    is $BENCH_RESULTS if set, else bench/results."""
    env = environment()
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-") or "cpu"
    results = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
    path = results / f"{name}_{slug}_{env['date']}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "environment": env, "rows": rows}, indent=1))
    print(f"saved {path}")
    return path
