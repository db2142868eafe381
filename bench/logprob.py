"""Benchmark of the fused log-prob against the naive PyTorch path, the bare matmuls and Liger-Kernel.

    python -m bench.logprob            # GPU: Qwen2.5-1.5B and 7B LM heads, N in {1024, 8192, 32768}
    python -m bench.logprob --quick    # GPU: N in {1024, 8192}; CPU: small shapes
    python -m bench.logprob --cpu      # CPU (also what runs without a GPU): Qwen2.5-0.5B's head, N = 4096

Implementations, all computing log p(target) per token (fwd) and its gradients in h and W (fwd+bwd):
  naive   logits = h @ W.T, log_softmax(logits.float() / T), gather: the N x V path peers use (the baseline, GPU)
  ref     kernels.logprob.logprob_ref, the definition: the fp32 N x V logits (the baseline, CPU)
  ours    kernels.logprob.logprob: the fused Triton kernel on GPU; on CPU the reference one slice of the
          vocabulary at a time (kernels/logprob_chunked.py; the reference itself when it fits one slice)
  liger   LigerFusedLinearCrossEntropyLoss (its per-token loss is -logp), when installed and on GPU
  matmul  the bound, not a log-prob: h @ W.T alone (fwd), and the three matmuls a backward needs (fwd+bwd)
TFLOP/s counts the useful work, 2NVD for the forward and 6NVD for forward+backward. Peak memory is what a
call allocates beyond its inputs, gradients included: CUDA's counters, on CPU the tensors counted by
bench.common.LiveTensorBytes. Ratios (time and peak) are over the baseline's and over the matmul bound's
time, measured in the same run; maxdiff_vs_fp32 compares log-probs with the fp32 reference on up to 1024 rows.
The table is saved as JSON under bench/results/.
"""

import torch

from bench.common import kernel_args, measure, save_result
from nanotorl.kernels import use_triton
from nanotorl.kernels.logprob import logprob, logprob_ref
from nanotorl.metrics import print_table

LM_HEADS = {"qwen2.5-1.5b": (1536, 151936), "qwen2.5-7b": (3584, 152064)}   # name: (D, V)
GPU_DTYPE = torch.bfloat16
CPU_HEADS = {"tiny-cpu": (128, 4096), "small-cpu": (256, 8192)}
CPU_MEMORY_HEADS = {"qwen2.5-0.5b": (896, 151936)}   # the CPU training memory case: N = 4096
COLUMNS = ["model", "N", "impl", "fwd_ms", "fwd_tflops", "fwd_peak_mb", "fwd_x_base", "fwd_peak_x_base", "fwd_x_matmul",
           "fwdbwd_ms", "fwdbwd_tflops", "fwdbwd_peak_mb", "fwdbwd_x_base", "fwdbwd_peak_x_base", "fwdbwd_x_matmul",
           "maxdiff_vs_fp32"]


def naive(h, W, targets, temperature=1.0):
    logits = h @ W.T                                                   # [N, V], the tensor we avoid
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def matmul_fwd(h, W, targets):
    return h @ W.T


def matmul_fwdbwd(h, W, targets):
    """The three matmuls of forward+backward: z = h W^T, dh = dz W, dW = dz^T h (z stands in for dz)."""
    z = h @ W.T
    return z @ W, z.T @ h


def with_grads(fwd):
    """Forward+backward of sum(logp) through ``fwd``: the gradients in h and W."""
    def run(h, W, targets):
        h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
        return torch.autograd.grad(fwd(h, W, targets).sum(), (h, W))
    return run


def implementations(device, matmul=True):
    """name -> (forward, forward+backward), the baseline first; and why Liger is left out (or None)."""
    bound = {"matmul": (matmul_fwd, matmul_fwdbwd)} if matmul else {}
    if device != "cuda":
        return {"ref": (logprob_ref, with_grads(logprob_ref)), "ours": (logprob, with_grads(logprob))} | bound, "no GPU"
    impls = {"naive": (naive, with_grads(naive)), "ours": (logprob, with_grads(logprob))}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        return impls | bound, f"not installed ({e}): pip install liger-kernel"
    per_token = LigerFusedLinearCrossEntropyLoss(reduction="none")
    summed = LigerFusedLinearCrossEntropyLoss(reduction="sum")  # its backward wants a scalar loss: -sum(logp)
    impls["liger"] = (lambda h, W, t: -per_token(W, h, t), with_grads(lambda h, W, t: -summed(W, h, t)))
    return impls | bound, None


def time_case(fwd, fwdbwd, h, W, targets, device, iters, warmup):
    """Median time (ms) and peak extra memory (MiB) of the forward (no grad) and of forward+backward."""
    def run_fwd():
        with torch.no_grad():
            fwd(h, W, targets)

    row = {}
    for key, fn in (("fwd", run_fwd), ("fwdbwd", lambda: fwdbwd(h, W, targets))):
        try:
            m = measure(fn, warmup=warmup, iters=iters, device=device, cpu_memory=True)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row[f"{key}_ms"] = "OOM"
            continue
        row[f"{key}_ms"] = m["time_s"] * 1e3
        row[f"{key}_peak_mb"] = m["peak_mem_bytes"] / 2**20
    return row


def bench_head(model, D, V, ns, device, dtype, iters, impls, warmup=1):
    rows = []
    for N in ns:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(N, D, device=device, dtype=dtype, generator=g)
        W = (torch.randn(V, D, device=device, generator=g) / D ** 0.5).to(dtype)
        targets = torch.randint(0, V, (N,), device=device, generator=g)
        check = slice(0, min(N, 1024))  # accuracy against the fp32 reference on the first rows
        reference = logprob_ref(h[check], W, targets[check])
        for impl, (fwd, fwdbwd) in impls.items():
            row = {"model": model, "N": N, "impl": impl}
            if impl == "ours":
                row["impl"] = f"ours ({'triton' if use_triton(h) else 'torch, chunked'})"
            try:
                row.update(time_case(fwd, fwdbwd, h, W, targets, device, iters, warmup))
            except Exception as e:  # a third-party kernel that fails on this shape: record it, go on
                if impl != "liger":
                    raise
                print(f"liger failed on {model} N={N}: {e!r}")
                continue
            if impl != "matmul":
                with torch.no_grad():
                    logp = fwd(h[check], W, targets[check]).float()
                row["maxdiff_vs_fp32"] = (logp - reference).abs().max().item()
            rows.append(row)
        del h, W, targets, reference
        if device == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows, V, D, baseline=next(iter(impls)))
    return rows


def add_ratios(rows, V, D, baseline):
    """TFLOP/s, and time and peak memory over the baseline's (x_base) and time over the matmul bound's."""
    for r in rows:
        for key, flops in (("fwd", 2 * r["N"] * V * D), ("fwdbwd", 6 * r["N"] * V * D)):
            t = r.get(f"{key}_ms")
            if not isinstance(t, float):
                continue
            r[f"{key}_tflops"] = flops / (t * 1e-3) / 1e12
            for base_impl, col in ((baseline, "base"), ("matmul", "matmul")):
                base = next((b for b in rows if b["N"] == r["N"] and b["impl"] == base_impl), {})
                if isinstance(base.get(f"{key}_ms"), float):
                    r[f"{key}_x_{col}"] = t / base[f"{key}_ms"]
                if col == "base" and base.get(f"{key}_peak_mb"):
                    r[f"{key}_peak_x_base"] = r[f"{key}_peak_mb"] / base[f"{key}_peak_mb"]


def gpu_sizes(quick: bool) -> tuple:
    """Token counts N measured on a GPU."""
    return (1024, 8192) if quick else (1024, 8192, 32768)


def main():
    args = kernel_args(__doc__, ("--cpu", "on the CPU even when a GPU is there"))
    cuda = torch.cuda.is_available() and not args.cpu
    warmup, matmul = 1, True
    if cuda:
        device, dtype, heads, ns = "cuda", GPU_DTYPE, LM_HEADS, gpu_sizes(args.quick)
        iters = 5 if args.quick else 10
    elif args.quick:
        print("CPU, small shapes in fp32: the vocabulary fits one slice, so 'ours' is the reference itself")
        device, dtype, heads, ns, iters = "cpu", torch.float32, CPU_HEADS, (128, 512), 3
    else:  # one call each (a matmul of this size takes seconds on CPU), no matmul bound: memory is the point
        print("CPU: Qwen2.5-0.5B's LM head in fp32, N = 4096: the chunked path against the reference")
        device, dtype, heads, ns, iters = "cpu", torch.float32, CPU_MEMORY_HEADS, (4096,), 1
        warmup, matmul = 0, False
    impls, why_not = implementations(device, matmul)
    if why_not:
        print(f"liger left out: {why_not}")
    rows = []
    for model, (D, V) in heads.items():
        rows += bench_head(model, D, V, ns, device, dtype, iters, impls, warmup)
        # after every head: a run stopped at its time limit keeps them
        save_result("logprob", rows, "" if cuda or not args.quick else "_quick")
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
