"""Benchmark of the flash-decoding kernel against SDPA over the padded, gathered KV cache.

    python -m bench.decode            # GPU: Qwen2.5-1.5B (12/2 heads) and 7B (28/4), d = 128, bf16,
                                      #      batch in {1, 16, 64, 256}, context in {512, 1024, 4096}
    python -m bench.decode --quick    # GPU: batch in {16, 256}, context in {1024, 4096}; CPU: small shapes

Every sequence attends to ``context`` cached positions of its own cache row (slots in shuffled order).
Implementations, all returning [B, Hq, d]:
  ours        kernels.decode_attention.decode_attention: Triton on GPU, the PyTorch reference on CPU
  sdpa        k_cache[slots] and v_cache[slots] gathered, then scaled_dot_product_attention with a length
              mask and grouped-query heads: what a model without a decode kernel does
  copy-bound  not attention: the time to read the KV bytes at the copy bandwidth measured on a 1 GiB copy
GB/s counts the KV bytes that must be read (2 x B x context x Hkv x d x element size); pct_copy_bw is
that over the measured copy bandwidth (read + write bytes over copy time); speedup_vs_sdpa is sdpa's time
over this row's, all measured in the same run. On GPU the table is saved as JSON under bench/results/.
"""

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth, kernel_args, measure, save_result
from nanotorl.kernels import use_triton
from nanotorl.kernels.decode_attention import decode_attention
from nanotorl.metrics import print_table

MODELS = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128)}   # name: (Hq, Hkv, d)
GPU_DTYPE = torch.bfloat16
CPU_MODELS = {"small-cpu": (12, 2, 64)}
COLUMNS = ["model", "B", "context", "impl", "ms", "GB/s", "pct_copy_bw", "speedup_vs_sdpa", "maxdiff_vs_sdpa"]


def sdpa_gathered(q, k_cache, v_cache, slots, lengths):
    """Gather the batch's cache rows, mask positions past each length, run SDPA with GQA."""
    B, Hq, d = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    k = k_cache[slots].transpose(1, 2)                                               # [B, Hkv, S, d]
    v = v_cache[slots].transpose(1, 2)
    mask = (torch.arange(S, device=q.device) < lengths[:, None])[:, None, None, :]   # [B, 1, 1, S]
    if Hq != Hkv:
        k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask)[:, :, 0]


def bench_case(model, Hq, Hkv, d, B, ctx, dtype, device, iters, copy_bw):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, d, device=device, generator=g).to(dtype)
    k_cache = torch.randn(B, ctx, Hkv, d, device=device, generator=g).to(dtype)
    v_cache = torch.randn(B, ctx, Hkv, d, device=device, generator=g).to(dtype)
    slots = torch.randperm(B, device=device, generator=g)
    lengths = torch.full((B,), ctx, device=device)
    args = (q, k_cache, v_cache, slots, lengths)
    kv_bytes = 2 * B * ctx * Hkv * d * k_cache.element_size()
    base = sdpa_gathered(*args).float()
    times = {"ours": measure(lambda: decode_attention(*args), iters=iters, device=device)["time_s"],
             "sdpa": measure(lambda: sdpa_gathered(*args), iters=iters, device=device)["time_s"],
             "copy-bound": kv_bytes / copy_bw}
    rows = []
    for impl, t in times.items():
        row = {"model": model, "B": B, "context": ctx, "impl": impl, "ms": t * 1e3, "GB/s": kv_bytes / t / 1e9,
               "pct_copy_bw": 100 * kv_bytes / t / copy_bw, "speedup_vs_sdpa": times["sdpa"] / t}
        if impl == "ours":
            row["impl"] = f"ours ({'triton' if use_triton(q) else 'torch ref'})"
            row["maxdiff_vs_sdpa"] = (decode_attention(*args).float() - base).abs().max().item()
        rows.append(row)
    return rows


def gpu_shapes(quick: bool) -> tuple[tuple, tuple]:
    """(batches, contexts) measured on a GPU."""
    return ((16, 256), (1024, 4096)) if quick else ((1, 16, 64, 256), (512, 1024, 4096))


def main():
    args = kernel_args(__doc__)
    cuda = torch.cuda.is_available()
    if cuda:
        device, dtype, models = "cuda", GPU_DTYPE, MODELS
        batches, contexts = gpu_shapes(args.quick)
        iters = 5 if args.quick else 20
    else:
        print("no GPU: small CPU shapes in fp32, 'ours' is the PyTorch reference path")
        device, dtype, models, batches, contexts, iters = "cpu", torch.float32, CPU_MODELS, (4, 16), (128, 512), 3
    copy_bw = copy_bandwidth(device, iters)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s")
    rows = []
    for model, (Hq, Hkv, d) in models.items():
        for B in batches:
            for ctx in contexts:
                rows += bench_case(model, Hq, Hkv, d, B, ctx, dtype, device, iters, copy_bw)
                if cuda:
                    torch.cuda.empty_cache()
                    save_result("decode", rows)  # after every case: a run stopped at its time limit keeps them
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
