"""Attention over packed rows, forward+backward: the dense-mask SDPA path against FlexAttention, flash-attn's varlen
kernel and causal SDPA per sequence (nanotorl/attention.py).

    python -m bench.attention            # GPU: rows of 4,096 and 16,384 tokens, bf16; CPU: rows of 1,024 and 2,048
    python -m bench.attention --quick    # only the longer rows, fewer iterations (bench/gpu_check.sh)

One row of T tokens packed with responses of about 3,000 tokens (a few hundred on CPU), Qwen2.5-1.5B's heads
(12 query heads, 2 KV heads, d = 128). Each call builds the row's packing (mask, block mask or sequence bounds,
what the model builds once per forward for all its layers), attends and back-propagates into q, k and v.
FlexAttention is compiled (its first call, compile included, is first_call_s); flash_attn runs when it imports.
Peak memory is what a call allocates beyond its inputs: CUDA's counters, on CPU the tensors counted by
bench.common.LiveTensorBytes. Ratios are over the dense path's time and memory, measured in the same run;
maxdiff is the largest difference of the output from the dense path's. Saved as JSON under bench/results/ after
every measurement, so that a run stopped at its time limit keeps what it measured.
"""
import os
import time

import torch

from bench.common import kernel_args, measure, save_result
from nanotorl.attention import attend, flash_varlen, pack
from nanotorl.metrics import print_table

HEADS = (12, 2, 128)   # Qwen2.5-1.5B: query heads, KV heads, head dim
COLUMNS = ["T", "sequences", "impl", "first_call_s", "ms", "peak_mb", "x_dense", "peak_x_dense", "maxdiff"]


def packed_row(T: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """seq_ids [1, T]: responses of mean_len +- a third, the last one cut to fill the row."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = min(T - total, int(torch.randint(2 * mean_len // 3, 4 * mean_len // 3 + 1, (), generator=g)))
        lengths.append(n)
        total += n
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def paths(device) -> tuple[list[str], list[str]]:
    """(the paths to measure, the dense baseline first; why others are left out)."""
    names, left_out = ["dense", "sdpa_varlen"], []
    if device == "cuda":
        names.insert(1, "flex")
    else:
        left_out.append("flex: FlexAttention has no backward on CPU (and its fused kernel needs torch.compile)")
    if device == "cuda" and flash_varlen()[0] is not None:
        names.insert(1, "flash_attn")
    else:
        left_out.append(f"flash_attn: {flash_varlen()[1] or 'needs a CUDA device'}")
    return names, left_out


def run_path(path, q, k, v, seq_ids, grad):
    """The packing of the row (path forced), attention, and the gradients of q, k and v; returns the output."""
    os.environ["NANOTORL_ATTENTION"] = path
    try:
        out = attend(q, k, v, pack(seq_ids, q.dtype))
    finally:
        del os.environ["NANOTORL_ATTENTION"]
    torch.autograd.grad(out, (q, k, v), grad)
    return out.detach()


def bench_row(T, mean_len, device, dtype, iters, names, rows, save):
    """Every path on one packed row of T tokens; appends to ``rows`` and calls ``save()`` after each."""
    seq_ids = packed_row(T, mean_len).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    Hq, Hkv, d = HEADS
    q, k, v = (torch.randn(1, T, H, d, device=device, dtype=dtype, generator=g).requires_grad_()
               for H in (Hq, Hkv, Hkv))
    grad = torch.randn(1, T, Hq, d, device=device, dtype=dtype, generator=g)
    dense_out = dense = None
    for path in names:
        t0 = time.perf_counter()
        out = run_path(path, q, k, v, seq_ids, grad)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        m = measure(lambda p=path: run_path(p, q, k, v, seq_ids, grad), warmup=0, iters=iters, device=device,
                    cpu_memory=True)
        row = {"T": T, "sequences": int(seq_ids.max()) + 1, "impl": path, "first_call_s": first,
               "ms": m["time_s"] * 1e3, "peak_mb": m["peak_mem_bytes"] / 2**20}
        dense_out, dense = (out, row) if dense is None else (dense_out, dense)
        row |= {"x_dense": row["ms"] / dense["ms"], "peak_x_dense": row["peak_mb"] / dense["peak_mb"],
                "maxdiff": (out.float() - dense_out.float()).abs().max().item()}
        rows.append(row)
        save()
        del out
        if device == "cuda":
            torch.cuda.empty_cache()


def main():
    args = kernel_args(__doc__)
    if torch.cuda.is_available():
        device, dtype, sizes, mean_len = "cuda", torch.bfloat16, (4096, 16384), 3000
    else:
        print("no GPU: small rows in fp32")
        device, dtype, sizes, mean_len = "cpu", torch.float32, (1024, 2048), 384
    sizes, iters = (sizes[-1:], 3) if args.quick else (sizes, 10)
    names, left_out = paths(device)
    for why in left_out:
        print(f"left out: {why}")
    rows = []
    for T in sizes:
        bench_row(T, mean_len, device, dtype, iters, names, rows,
                  save=lambda: save_result("attention", rows, "_quick" if args.quick else ""))
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
