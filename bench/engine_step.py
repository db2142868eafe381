"""The generator's own cost per decoding step: the host time that is not the model.

    python -m bench.engine_step                 # B = 64 and 256, 64 new tokens each
    python -m bench.engine_step --batches 256 --new 128

A model whose forward costs almost nothing writes given scripts (:class:`bench.generate.Scripted` over
:class:`NullModel`, whose hidden states are zeros): half the sequences write a ```python block, which a sandbox that
answers at once runs, so a step holds everything the generator does per step: scheduling, cache bookkeeping,
sampling set-up and the sampler, fence checks, observations, result handling. Columns: steps = model calls;
step_ms = wall time per step; model_ms = time inside the model per step; engine_ms = the difference, the engine's
own cost; floor_ms = gpt-fast's decode loop with the same model (a forward and a sample per step, nothing else).
"""
import argparse
import tempfile
import time

import torch

from bench.common import save_result
from bench.generate import FakeSandbox, Scripted, equal_length_prompts, tool_script
from nanotorl.kernels.sampling import sample
from nanotorl.demo import demo_config, save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.metrics import print_table
from nanotorl.tokenizer import Tokenizer

COLUMNS = ["B", "new", "steps", "step_ms", "model_ms", "engine_ms", "floor_ms"]


class NullModel(torch.nn.Module):
    """The generator's model interface at almost no cost: zeros for hidden states, zeros for logits."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.head_weight = torch.nn.Parameter(torch.zeros(cfg.vocab_size, 1))

    def forward(self, ids, positions=None, seq_ids=None, cache=None, slots=None):
        if isinstance(ids, list):
            return [torch.zeros(*i.shape, 1) for i in ids]  # [B_i, T_i, 1] per group
        return torch.zeros(*ids.shape, 1)

    def logits(self, h):
        return h.expand(*h.shape[:-1], self.cfg.vocab_size)  # [R, V] of zeros, no copy


class Timed(Scripted):
    """:class:`Scripted` that counts its calls and the time spent in them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls, self.seconds = 0, 0.0

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = super().forward(*args, **kwargs)
        self.calls, self.seconds = self.calls + 1, self.seconds + time.perf_counter() - t0
        return out

    def logits(self, x):
        t0 = time.perf_counter()
        out = super().logits(x)
        self.seconds += time.perf_counter() - t0
        return out


def floor_step_s(model: Timed, B: int, steps: int) -> float:
    """Seconds per step of gpt-fast's loop: every slot decodes one token (forward, logits, sample), nothing else."""
    ids, slots = torch.zeros(B, 1, dtype=torch.long), torch.arange(B)
    temperature, top_p = torch.ones(B), torch.ones(B)
    top_k, seeds = torch.zeros(B, dtype=torch.long), torch.arange(B)
    positions = torch.zeros(B, 1, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(steps):
        h = model(ids, positions, None, None, slots)[:, -1]
        ids, _ = sample(model.logits(h).float(), temperature, top_k, top_p, torch.zeros(B), seeds, positions[:, 0])
        ids, positions = ids[:, None], positions + 1
    return (time.perf_counter() - t0) / steps


def engine_cost(batches: list[int], tok: Tokenizer, new: int = 64, runs: int = 3) -> list[dict]:
    """One row per batch size (median of ``runs``)."""
    rows = []
    for B in batches:
        prompts = list({tuple(p): p for p in equal_length_prompts(tok, 4 * B)}.values())[:B]
        leads = [(i * 5) % (new // 2) if i % 2 else None for i in range(len(prompts))]
        scripts = {tuple(p): tool_script(tok, p, new, lead) for p, lead in zip(prompts, leads)}
        model = Timed(NullModel(demo_config(tok.vocab_size)), scripts, len(prompts))
        gen = Generator(model, tok, FakeSandbox(0.0, workers=4), slots=len(prompts),
                        max_len=len(prompts[0]) + new, stop_ids=[])
        requests = [Request(p, max_new_tokens=new, sampling=SamplingParams(temperature=1.0)) for p in prompts]
        measured = []
        for _ in range(runs + 1):  # the first is a warm-up
            model.calls, model.seconds = 0, 0.0
            t0 = time.perf_counter()
            gen.generate(requests)
            measured.append((time.perf_counter() - t0, model.calls, model.seconds))
        wall, steps, inside = sorted(measured[1:])[len(measured[1:]) // 2]
        gen.sandbox.pool.shutdown()
        rows.append({"engine": "null model", "B": len(prompts), "new": new, "steps": steps,
                     "step_ms": 1e3 * wall / steps, "model_ms": 1e3 * inside / steps,
                     "engine_ms": 1e3 * (wall - inside) / steps, "floor_ms": 1e3 * floor_step_s(model, B, new)})
    print_table(rows, COLUMNS)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_demo_tokenizer(tmp)
        tok = Tokenizer(tmp)
    save_result("engine_step", engine_cost([int(b) for b in args.batches.split(",")], tok, args.new))


if __name__ == "__main__":
    main()
