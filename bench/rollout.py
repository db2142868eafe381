"""Rollout speed on ToRL's workload: our generator against ToRL's own loop on Hugging Face ``generate``.

    python -m bench.rollout                                   # committed demo base, 16 problems x 8 samples
    python -m bench.rollout --model runs/demo/checkpoints/step_000060     # a trained demo checkpoint
    python -m bench.rollout --trigger output --calls 0,1,2
    python -m bench.rollout --compile                         # ours with the compiled CPU decoding forward

The workload is the rollout of one demo GRPO step: N held-out arithmetic problems x G samples, temperature 1, the
tokenizer's end ids, ``--max-new-tokens`` per response (tool output included) and at most C tool calls, code run in
the real :class:`sandbox.SandboxPool`, every response scored with our reward (:func:`nanotorl.rollout.score_completion`,
not timed). C = 0 is the control without tools. ToRL's loop on HF ``generate``, and what makes it a fair baseline,
is in :mod:`bench.torl_loop`; both sides load the same checkpoint (fp32), run on the same threads (``--threads``) and
the same sandbox pool, get one warm-up run, then ``--runs`` runs with the same seeds (ours: the per-response seeds
of the rollout; HF: ``torch.manual_seed``), of which the median is shown.

Columns: s = wall time of the rollout (generation, sandbox runs, observations); resp_tok = response tokens (tool output
included; the two sides draw different samples, so they differ a little); s_per_1k = s per 1,000 response tokens;
prefill = tokens fed through multi-token forwards (HF: padded rows x width of every call); tool = fraction of
responses that called the tool; acc = accuracy; speedup = HF's s_per_1k over ours (wall-time ratio beside it).
Then the engine's own cost per decoding step (:mod:`bench.engine_step`).
"""
import argparse
import statistics
import time

import torch

from bench.common import save_result
from bench.engine_step import engine_cost
from bench.torl_loop import torl_loop
from nanotorl.checkpoint import load_model
from nanotorl.data import arithmetic_problems
from nanotorl.demo import BASE_DIR
from nanotorl.fences import line_ends
from nanotorl.generate import Generator, SamplingParams
from nanotorl.metrics import print_table
from nanotorl.rollout import finish_stats, groups, requests, rollout_stats, score_completion
from nanotorl.tokenizer import Tokenizer
from nanotorl.sandbox import SandboxPool

COLUMNS = ["C", "impl", "s", "resp_tok", "s_per_1k", "prefill", "tool", "acc", "speedup", "wall_ratio"]


def timed(fn, runs: int) -> tuple[float, object]:
    """Median wall time of ``runs`` calls after one warm-up, and the last call's result."""
    out, times = fn(), []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def summary(impl: str, calls: int, seconds: float, draws, completions, prefilled: int, tok) -> dict:
    samples = [score_completion(d.problem, c, tok.decode) for d, c in zip(draws, completions)]
    stats = finish_stats(rollout_stats(samples))
    tokens = sum(len(c.response_ids) for c in completions)
    return {"C": calls, "impl": impl, "s": seconds, "resp_tok": tokens, "s_per_1k": 1e3 * seconds / tokens,
            "prefill": prefilled, "tool": stats["tool_fraction"], "acc": stats["accuracy"]}


def workload(args, model, tok, box, calls: int) -> tuple[list, list, Generator]:
    """One workload (C = ``calls``): the draws, their requests and our generator for them."""
    problems = arithmetic_problems(args.problems, seed=args.seed, split="heldout")
    draws = groups(problems, args.samples, SamplingParams(temperature=args.temperature))
    batch = requests(tok, draws, max_new_tokens=args.max_new_tokens, max_tool_calls=calls, seed=args.seed)
    width = max(len(r.prompt_ids) for r in batch)
    gen = Generator(model, tok, box, slots=min(args.slots, len(batch)), max_len=width + args.max_new_tokens,
                    trigger=args.trigger, compile=args.compile)
    return draws, batch, gen


def compare(args, model, hf, tok, box, calls: int, may_fire: torch.Tensor) -> list[dict]:
    """Both sides on one workload (C = ``calls``): a row each, ours with the speedup over HF."""
    draws, batch, gen = workload(args, model, tok, box, calls)
    ours_s, completions = timed(lambda: gen.generate(batch), args.runs)
    impl = "ours+compile" if args.compile else "ours"
    ours = summary(impl, calls, ours_s, draws, completions, sum(c.prefill_tokens for c in completions), tok)
    gen.close()
    hf_s, (hf_completions, prefilled) = timed(lambda: torl_loop(
        hf, tok, box, [r.prompt_ids for r in batch], max_new_tokens=args.max_new_tokens, max_tool_calls=calls,
        trigger=args.trigger, temperature=args.temperature, seed=args.seed, may_fire=may_fire), args.runs)
    base = summary("hf_torl_loop", calls, hf_s, draws, hf_completions, prefilled, tok)
    ours |= {"speedup": base["s_per_1k"] / ours["s_per_1k"], "wall_ratio": hf_s / ours_s}
    return [ours, base]


def workload_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the workload (:func:`workload`), shared with :mod:`bench.rollout_profile`."""
    parser.add_argument("--model", default=str(BASE_DIR), help="Hugging Face Qwen2 directory (default: the demo base)")
    parser.add_argument("--problems", type=int, default=16, help="N held-out arithmetic problems")
    parser.add_argument("--samples", type=int, default=8, help="G samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--trigger", default="fence", choices=["fence", "output"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--slots", type=int, default=128, help="our generator's slots (the demo's gen_slots)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (median), after one warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sandbox-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="our decoding forward compiled (Generator(compile=True); the warm-up run compiles it)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_args(parser)
    parser.add_argument("--calls", default="0,1,2", help="comma-separated C (tool calls per response)")
    parser.add_argument("--engine-batches", default="64,256", help="batches of the engine-cost table ('' to skip)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import Qwen2ForCausalLM
    tok = Tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32, vocab=tok.vocab_size).eval()
    hf = Qwen2ForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"{args.model}: {args.problems} problems x {args.samples} samples, T={args.temperature}, "
          f"max_new_tokens={args.max_new_tokens}, trigger {args.trigger}, {torch.get_num_threads()} thread(s)")
    rows, setup = [], {k: v for k, v in vars(args).items() if k != "engine_batches"}
    may_fire = torch.tensor(line_ends(tok))  # [V]: where ToRL's loop checks for a call (at line ends only)
    with SandboxPool(workers=args.sandbox_workers) as box:
        for calls in (int(c) for c in args.calls.split(",")):
            rows += compare(args, model, hf, tok, box, calls, may_fire)
            print_table(rows[-2:], COLUMNS)
            save_result("rollout", [setup | r for r in rows])
    print()
    print_table(rows, COLUMNS)
    if args.engine_batches:
        engine = engine_cost([int(b) for b in args.engine_batches.split(",")], tok)
        rows += engine
    save_result("rollout", [setup | r for r in rows])


if __name__ == "__main__":
    main()
