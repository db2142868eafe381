"""Benchmark of the sort-free sampler against PyTorch's sort-based and Gumbel/multinomial sampling.

    python -m bench.sampling            # GPU: V = 151,936 (Qwen2.5), B in {1, 32, 256}, bf16 and fp32 logits
    python -m bench.sampling --quick    # GPU: B in {32, 256}, bf16; CPU: small shapes (the reference path)

Cases: plain (temperature 1), top-k 50, top-p 0.95, and top-k 50 with top-p 0.9 (temperature 0.8).
Implementations, all drawing one token per row from [B, V] logits:
  ours         kernels.sampling.sample: the Triton kernels on GPU, the PyTorch reference on CPU
  sort         softmax, sort, top-k and top-p masks on the sorted probs, cumsum, multinomial: the usual path
  gumbel       argmax(probs / Exp(1)) (the exponential race of gpt-fast and vLLM): plain case only
  multinomial  torch.multinomial(softmax(logits / T)): plain case only
  read-bound   not a sampler: half the time of a copy of the logits, i.e. one read at copy bandwidth
GB/s counts one read of the logits. speedup_vs_sort is sort's time over this row's, and x_read_bound
this row's time over read-bound's, all measured in the same run. On GPU the table is saved as JSON
under bench/results/.
"""

import torch

from bench.common import kernel_args, measure, save_result
from nanotorl.kernels import use_triton
from nanotorl.kernels.sampling import sample
from nanotorl.metrics import print_table

CASES = {  # name: (temperature, top_k, top_p)
    "plain": (1.0, 0, 1.0),
    "top-k 50": (1.0, 50, 1.0),
    "top-p 0.95": (1.0, 0, 0.95),
    "top-k 50 + top-p 0.9": (0.8, 50, 0.9),
}
GPU_VOCAB = 151936   # Qwen2.5
COLUMNS = ["case", "B", "V", "dtype", "impl", "ms", "GB/s", "speedup_vs_sort", "x_read_bound"]


def sort_based(logits, temperature, top_k, top_p):
    """The PyTorch path peers use: [B, V] softmax and a full sort per row."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if top_k > 0:
        sorted_p[:, top_k:] = 0.0
    if top_p < 1.0:
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p * sorted_p.sum(-1, keepdim=True), 0.0)
    pick = torch.multinomial(sorted_p, 1)
    return order.gather(-1, pick)[:, 0]


def gumbel(logits, temperature, top_k, top_p):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def multinomial(logits, temperature, top_k, top_p):
    return torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1)[:, 0]


def ours(B, temperature, top_k, top_p, device):
    """kernels.sampling.sample with its per-row parameter tensors built once, outside the timing."""
    params = (torch.full((B,), temperature, device=device), torch.full((B,), top_k, device=device),
              torch.full((B,), top_p, device=device), torch.zeros(B, device=device),
              torch.full((B,), 1234, device=device), torch.arange(B, device=device))
    return lambda logits, *_: sample(logits, *params)[0]


def bench_shape(B, V, dtype, device, iters):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, V, device=device, generator=g) * 3).to(dtype)
    nbytes = logits.numel() * logits.element_size()
    read = measure(lambda: logits.clone(), iters=iters, device=device)["time_s"] / 2
    rows = []
    for case, (T, k, p) in CASES.items():
        impls = {"ours": ours(B, T, k, p, device), "sort": sort_based}
        if case == "plain":
            impls |= {"gumbel": gumbel, "multinomial": multinomial}
        times = {name: measure(lambda fn=fn: fn(logits, T, k, p), iters=iters, device=device)["time_s"]
                 for name, fn in impls.items()}
        times["read-bound"] = read
        for name, t in times.items():
            label = f"ours ({'triton' if use_triton(logits) else 'torch ref'})" if name == "ours" else name
            rows.append({"case": case, "B": B, "V": V, "dtype": str(dtype).removeprefix("torch."), "impl": label,
                         "ms": t * 1e3, "GB/s": nbytes / t / 1e9, "speedup_vs_sort": times["sort"] / t,
                         "x_read_bound": t / read})
    return rows


def gpu_shapes(quick: bool) -> list[tuple]:
    """(B, dtype) of the logits measured on a GPU."""
    if quick:
        return [(32, torch.bfloat16), (256, torch.bfloat16)]
    return [(B, dt) for dt in (torch.bfloat16, torch.float32) for B in (1, 32, 256)]


def main():
    args = kernel_args(__doc__)
    cuda = torch.cuda.is_available()
    if cuda:
        device, V, shapes = "cuda", GPU_VOCAB, gpu_shapes(args.quick)
        iters = 5 if args.quick else 20
    else:
        print("no GPU: small CPU shapes in fp32, 'ours' is the PyTorch reference path")
        device, V, iters = "cpu", 32000, 3
        shapes = [(8, torch.float32), (64, torch.float32)]
    rows = []
    for B, dtype in shapes:
        rows += bench_shape(B, V, dtype, device, iters)
        if cuda:
            save_result("sampling", rows)  # after every shape: a run stopped at its time limit keeps them
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
