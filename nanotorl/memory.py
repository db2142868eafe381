"""Peak memory of each phase of a training step (generation, training, save), as train.py logs it.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (what the caching allocator handed out), reset at the
start of each phase. On CPU it is the process's peak resident set size: Linux's ``VmHWM``, which writing ``5`` to
``/proc/self/clear_refs`` resets to the current RSS; where that file cannot be written the peak is the process's
since it started (``VmHWM`` never reset), an upper bound.
"""
import re
import resource
from pathlib import Path

import torch

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak(device: torch.device) -> None:
    """Start a new peak: the next :func:`peak_bytes` counts from now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or a kernel that refuses it: the peak stays the process's own
        pass


def peak_bytes(device: torch.device) -> int:
    """Peak memory since the last :func:`reset_peak`: allocated bytes on CUDA, resident bytes on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024
    except (OSError, AttributeError):  # no /proc: the peak RSS getrusage keeps (kilobytes on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhasePeaks:
    """The peak of each phase of a step: :meth:`start` begins a phase, :meth:`end` names the one that just ended
    and records its peak as ``memory_<phase>_gb`` (1e9 bytes), then begins the next."""

    def __init__(self, device: torch.device):
        self.device, self.gb = device, {}

    def start(self) -> None:
        reset_peak(self.device)

    def end(self, phase: str) -> None:
        self.gb[f"memory_{phase}_gb"] = peak_bytes(self.device) / 1e9
        reset_peak(self.device)

    def take(self) -> dict:
        """The peaks recorded since the last call, and forget them."""
        out, self.gb = self.gb, {}
        return out
