"""One decoding step of every cache slot: eager, captured as a CUDA graph, and under ``torch.compile``.

    python -m bench.decode_step                 # CPU: the demo model (random init), 64 slots, fp32
    python -m bench.decode_step --device cuda   # a random Qwen2.5-1.5B-shaped model, bf16, 256 slots
    python -m bench.decode_step --device cuda --impls eager,compiled   # some rows only (compiling takes minutes)

The step is :class:`nanotorl.decode_step.DecodeStep`: one token for every slot at position ``length / 2`` of
a cache of ``length`` positions, then the next token of every slot sampled (temperature 1). Rows:
  eager     the step as it runs without capture (the Triton kernels on CUDA, the PyTorch references on CPU)
  graph     the same step captured once as a CUDA graph and replayed (CUDA only)
  compiled  the eager step under ``torch.compile(dynamic=False)``, mode "reduce-overhead" on CUDA (inductor's
            own CUDA graphs); compile_s is its first call
ms = median wall time of one step, tokens read back to the host included; speedup_vs_eager in the same run.
"""
import argparse
import time

import torch

from bench.common import measure, save_result
from bench.generate import qwen25_15b
from nanotorl.decode_step import DecodeStep
from nanotorl.demo import demo_config
from nanotorl.generate import Request, SamplingParams
from nanotorl.metrics import print_table
from nanotorl.model import KVCache, Qwen2

COLUMNS = ["model", "slots", "length", "impl", "ms", "speedup_vs_eager", "compile_s"]
GPU_CASES = [(256, 2048)]  # (slots, cache length) on a GPU


def bench_case(name, model, slots: int, length: int, device: str, iters: int, impls: list[str]) -> list[dict]:
    p = next(model.parameters())
    cache = KVCache(model.cfg, slots, length, device=device, dtype=p.dtype)
    ids = torch.arange(slots, device=device) % model.cfg.vocab_size  # [slots]
    positions = torch.full((slots,), length // 2, device=device)
    steps = {"eager": DecodeStep(model, cache, graph=False)}
    if "graph" in impls and device == "cuda":
        steps["graph"] = DecodeStep(model, cache, graph=True)
    compile_s = ""
    if "compiled" in impls:
        compiled = steps["compiled"] = DecodeStep(model, cache, graph=False)  # the same step, its body compiled
        compiled._run = torch.compile(compiled._run, dynamic=False,
                                      mode="reduce-overhead" if device == "cuda" else None)
    for step in steps.values():
        for i in range(slots):
            step.set_request(i, Request([0], sampling=SamplingParams(temperature=1.0), seed=i))
    if "compiled" in steps:
        t0 = time.perf_counter()
        steps["compiled"](ids, positions)
        compile_s = time.perf_counter() - t0
    times = {impl: measure(lambda s=step: s(ids, positions), warmup=2, iters=iters, device=device)["time_s"]
             for impl, step in steps.items() if impl in impls}
    return [{"model": name, "slots": slots, "length": length, "impl": impl, "ms": t * 1e3,
             "speedup_vs_eager": times["eager"] / t if "eager" in times else "",
             "compile_s": compile_s if impl == "compiled" else ""}
            for impl, t in times.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impls", default="eager,graph,compiled", help="comma-separated rows to measure")
    args = parser.parse_args()
    impls = args.impls.split(",")
    if not set(impls) <= {"eager", "graph", "compiled"}:
        raise SystemExit(f"--impls: expected some of eager,graph,compiled, got {args.impls}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch; run on a GPU machine or use --device cpu")
    torch.manual_seed(0)
    if args.device == "cuda":
        name, cfg, dtype, cases, iters = "qwen2.5-1.5b-shape (bf16)", qwen25_15b(), torch.bfloat16, \
            GPU_CASES, 20
    else:
        torch.set_num_threads(1)
        name, cfg, dtype, cases, iters = "demo (fp32)", demo_config(105), torch.float32, [(64, 128), (64, 2048)], 10
    with torch.device(args.device), torch.no_grad():
        model = Qwen2(cfg).init_weights().to(dtype).eval()
        rows, tag = [], "" if args.impls == parser.get_default("impls") else "_" + "-".join(impls)
        for slots, length in cases:
            case = bench_case(name, model, slots, length, args.device, iters, impls)
            print_table(case, COLUMNS)
            rows += case
            save_result("decode_step", rows, tag)  # after every case: a run stopped at its time limit keeps them
            torch._dynamo.reset()
    print()
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
