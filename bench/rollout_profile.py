"""Where the time of one rollout goes: :mod:`bench.rollout`'s workload, our generator only, per phase and per op family.

    python -m bench.rollout_profile                         # committed demo base, C = 1
    python -m bench.rollout_profile --model runs/demo/checkpoints/step_000060 --calls 1

After one warm-up, ``--runs`` rollouts are timed with wall-clock timers around the generator's parts (phases: the
model's forwards, the sampler with the LM head, appending tokens and reading lines for fences, waiting for tool
results, the rest), then one more runs under ``torch.profiler``, whose ops' self CPU time is summed by family
(:data:`FAMILIES`: the first pattern an op's name contains decides). Shares are of the whole rollout's wall time
(phases) and of the profiled ops' total self time (families); the three largest ops of "other" are named.
"""
import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import save_result
from bench.rollout import workload, workload_args
from nanotorl.checkpoint import load_model
from nanotorl.generate import Generator
from nanotorl.metrics import print_table
from nanotorl.sandbox import SandboxPool
from nanotorl.tokenizer import Tokenizer

PHASES = {"_forward": "forward", "_sample": "sampler", "_advance": "append + fences",  # not nested in each other
          "_collect_tool_results": "tool wait"}
FAMILIES = [  # (family, substrings of aten op names)
    ("matmul", ("addmm", "aten::mm", "bmm", "baddbmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "softmax", "masked_fill")),
    ("cache write/read", ("index_copy", "index_put", "index_select", "aten::index", "gather", "aten::copy_")),
    ("norm", ("rms_norm", "aten::pow", "aten::mean", "rsqrt")),
    ("rope", ("roll", "aten::cos", "aten::sin")),
    ("sampler arithmetic", ("bitwise", "rshift", "lshift", "xor", "__and__", "__or__", "aten::log", "logsumexp",
                            "exp", "cumsum", "max", "argmax", "topk", "sort", "where")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu", "neg", "aten::cat", "aten::to",
                     "_to_copy", "aten::fill_", "aten::zero_", "aten::empty", "aten::clone")),
]


def timed_phases(gen: Generator) -> dict:
    """Wrap the generator's parts (:data:`PHASES`) in wall-clock timers; returns the running totals (s)."""
    totals = defaultdict(float)
    for method, phase in PHASES.items():
        inner = getattr(gen, method)

        def timer(*args, inner=inner, phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - t0
        setattr(gen, method, timer)
    return totals


def family(op: str) -> str:
    return next((name for name, parts in FAMILIES if any(p in op for p in parts)), "other")


def op_families(prof) -> tuple[dict, list]:
    """Self CPU time (s) per family, and the three largest ops of "other"."""
    by_family, other = defaultdict(float), []
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        by_family[family(e.key)] += e.self_cpu_time_total / 1e6
        if family(e.key) == "other":
            other.append((e.self_cpu_time_total / 1e6, e.key))
    return by_family, sorted(other, reverse=True)[:3]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_args(parser)
    parser.add_argument("--calls", type=int, default=1, help="C: tool calls per response")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32, vocab=tok.vocab_size).eval()
    with SandboxPool(workers=args.sandbox_workers) as box:
        _, batch, gen = workload(args, model, tok, box, args.calls)
        gen.generate(batch)  # warm-up
        totals, walls = timed_phases(gen), []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            gen.generate(batch)
            walls.append(time.perf_counter() - t0)
        totals = dict(totals)  # the profiled run is not timed
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen.generate(batch)
        gen.close()
    wall = sum(walls)
    phases = totals | {"rest": wall - sum(totals.values())}
    rows = [{"phase": k, "share": round(v / wall, 3), "ms_per_rollout": round(1e3 * v / args.runs, 1)}
            for k, v in phases.items()]
    print(f"{args.model}, C={args.calls}: {args.problems} x {args.samples}, median rollout "
          f"{statistics.median(walls):.3f} s over {args.runs} runs, {torch.get_num_threads()} thread(s)")
    print_table(rows, ["phase", "share", "ms_per_rollout"])
    by_family, other = op_families(prof)
    total = sum(by_family.values())
    fam_rows = [{"family": k, "share": round(v / total, 3)} for k, v in sorted(by_family.items(), key=lambda x: -x[1])]
    print_table(fam_rows, ["family", "share"])
    print("largest of other: " + ", ".join(f"{name} {s / total:.1%}" for s, name in other))
    save_result("rollout_profile", [vars(args) | r for r in rows + fam_rows])


if __name__ == "__main__":
    main()
