"""Memory per rank: the plan of a training run from the arithmetic (train.py prints it at start-up), and the
peaks each phase of a step actually took (:class:`PhasePeaks`, logged per step).

One step has two phases, and each rank holds, in bytes (P_i the elements of parameter i, dim 0 d0_i, W ranks;
FSDP2 shards dim 0, padded to a multiple of W):

  both     weights    sum_i ceil(d0_i / W) * P_i / d0_i * m   the sharded master weights (m: 4 bytes, fp32 on GPU)
           optimizer  2x weights                              AdamW's m and v, sharded like the weights
  rollout  gathered   sum_i P_i * b                           every weight unsharded for generation (b: bf16, 2)
           KV cache   2 * L * slots * Hkv * S * d * b         S = longest prompt + max_new + prefill_chunk positions
  train    gradients  = weights                               sharded, as the master weights
           log-prob   N * D * (4 + b) + V * D * b + 4 * min(V, V_slice) * D
                      the fused log-prob's backward: fp32 dh and dh, the head's dW and its fp32 slice
           activations L * N * D * b + N * a_layer (checkpointed: each block's input, then one block recomputed),
                      or L * N * a_layer; a_layer = 8D + 8 + 2bD + 5b Hq d + 4 Hq + 4b I per token (rms-norm inputs
                      in fp32 and their outputs, q and K/V expanded to Hq heads, attention output and its copy,
                      log-sum-exp, four [I] tensors of the MLP), masks of packed rows left out
  (N = micro_batch_tokens, D hidden, I intermediate, V vocabulary, L layers)

The KV cache is freed before ``train_step`` unless ``--keep-kv-cache``: then the train phase holds it too. Not
counted: CUDA's context and the caching allocator's fragmentation (measure those on the GPU), one block's gathered
weights during training, the log-prob's per-token vectors (partials, lse, coefficients: a few hundred bytes a
token) and the slot table.

Measured (:class:`PhasePeaks`): on CUDA the peak is ``torch.cuda.max_memory_allocated`` (what the caching
allocator handed out), reset at the start of each phase. On CPU it is the process's peak resident set size:
Linux's ``VmHWM``, which writing ``5`` to ``/proc/self/clear_refs`` resets to the current RSS; where that file
cannot be written the peak is the process's since it started (``VmHWM`` never reset), an upper bound.
"""
import ctypes
import math
import platform
import re
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from nanotorl.kernels.logprob import _DW_SCRATCH_BYTES
from nanotorl.model import Qwen2, Qwen2Config


def _size(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def parameter_shapes(cfg: Qwen2Config) -> list[torch.Size]:
    """The shape of every parameter of the model ``cfg`` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return [p.shape for p in Qwen2(cfg).parameters()]


def sharded_elements(shapes, world: int) -> int:
    """Elements one rank holds when FSDP2 shards each parameter along dim 0, padded to a multiple of ``world``."""
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes)


@dataclass
class MemoryPlan:
    rows: dict        # name -> bytes per rank
    keep_kv_cache: bool

    def phases(self) -> dict:
        """Bytes per rank held during the rollout and during train_step."""
        r = self.rows
        both = r["weights"] + r["optimizer"]
        train = both + r["gradients"] + r["log-prob"] + r["activations"]
        return {"rollout": both + r["gathered"] + r["KV cache"],
                "train": train + (r["KV cache"] if self.keep_kv_cache else 0)}

    def table(self) -> str:
        """One line per item and per phase, in GiB, as train.py prints it."""
        lines = [f"  {name:<12} {b / 2**30:8.2f} GiB" for name, b in self.rows.items()]
        lines += [f"  {name + ' total':<12} {b / 2**30:8.2f} GiB" for name, b in self.phases().items()]
        return "memory plan per rank (from the arithmetic, nanotorl/memory.py):\n" + "\n".join(lines)


def memory_plan(cfg: Qwen2Config, world: int, slots: int, cache_len: int, micro_batch_tokens: int,
                master_dtype: torch.dtype, param_dtype: torch.dtype, checkpointing: bool,
                keep_kv_cache: bool = False) -> MemoryPlan:
    """The plan of the module docstring. ``cache_len``: the KV cache's positions per slot; ``master_dtype``: the
    sharded weights' dtype; ``param_dtype``: the dtype they compute (and generate) in."""
    shapes = parameter_shapes(cfg)
    m, b = _size(master_dtype), _size(param_dtype)
    N, D, I, V, L = (micro_batch_tokens, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
                     cfg.num_hidden_layers)
    Hq, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    weights = sharded_elements(shapes, world) * m
    per_layer = 8 * D + 8 + 2 * b * D + 5 * b * Hq * d + 4 * Hq + 4 * b * I   # bytes per token, one block
    slice_rows = max(128, _DW_SCRATCH_BYTES // (4 * D) // 128 * 128)          # the backward's dW slice (16-bit W)
    return MemoryPlan({
        "weights": weights,
        "optimizer": 2 * weights,
        "gathered": sum(math.prod(s) for s in shapes) * b,
        "KV cache": 2 * L * slots * Hkv * cache_len * d * b,
        "gradients": weights,
        "log-prob": N * D * (4 + b) + V * D * b + (4 * min(V, slice_rows) * D if b != 4 else 0),
        "activations": (L * N * D * b + N * per_layer) if checkpointing else L * N * per_layer,
    }, keep_kv_cache)


def run_plan(cfg, model_cfg: Qwen2Config, world: int, cuda: bool, cache_len: int) -> MemoryPlan:
    """The plan of a run of ``cfg`` (a :class:`nanotorl.config.TrainConfig`) as train.py loads it: fp32 master
    weights computing in ``--dtype`` on GPU, ``--dtype`` weights on CPU."""
    dtype = getattr(torch, cfg.optim.dtype)
    return memory_plan(model_cfg, world, cfg.rollout.gen_slots, cache_len, cfg.optim.micro_batch_tokens,
                       torch.float32 if cuda else dtype, dtype, cfg.optim.activation_checkpointing,
                       cfg.rollout.keep_kv_cache)


def adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """The trainer's AdamW, fused: one kernel updates weight, m and v in place, so the step allocates nothing.

    PyTorch's other two AdamW paths allocate during the step: the per-tensor loop (its CPU default) makes two
    temporaries the size of the largest parameter (sqrt(v), then its division: 1.09 GB for a 151,936 x 896
    embedding), and the foreach path (its CUDA default) one the size of all of them (sqrt(v) of every parameter).
    The fused update is the same arithmetic (rounding apart), on CPU and CUDA, and on FSDP2's sharded
    parameters."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)


M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024  # glibc's mallopt parameter, and its starting value


def return_freed_tensors() -> bool:
    """Make every freed host tensor of 128 KiB or more go back to the kernel at once; False where the C library
    is not glibc (nothing changed).

    glibc serves an allocation from its own mmap when it is at least a threshold (128 KiB at start), so freeing
    it returns the pages; but the first such block freed raises the threshold to its size (up to 32 MiB), after
    which blocks below it come from the heap and stay resident when freed, wherever a live block lies above
    them. A training process frees 2-32 MiB tensors all the time (gradients, activations), so its resident set
    grew by what earlier phases had freed (README, "Checkpoints and memory"). Setting the threshold fixes it at
    128 KiB (glibc then stops adjusting it), as in a fresh process: the resident set follows the live tensors,
    for a page fault per new page."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


# ------------------------------------------------------------------------------------------ measured peaks
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
