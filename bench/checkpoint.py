"""Wall time of one training checkpoint (weights, AdamW state, RNG) at a real model shape, on 1 or more processes.

    python -m bench.checkpoint --shape qwen2.5-0.5b
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.checkpoint --shape qwen2.5-0.5b

Random weights, AdamW's state made by one step; ``save_checkpoint`` runs ``--repeats`` times into a temporary
directory and rank 0 prints the median time and its own peak RSS added by the save (:mod:`nanotorl.memory`).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import save_result
from bench.memory import SHAPES
from nanotorl import dist
from nanotorl.training_checkpoint import save_checkpoint
from nanotorl.memory import adamw, peak_bytes, reset_peak
from nanotorl.model import Qwen2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rank, world, device = dist.setup()
    torch.manual_seed(0)
    model = dist.shard(Qwen2(SHAPES[args.shape]).init_weights().to(device))
    optimizer = adamw(model.parameters(), lr=1e-6)
    ids = torch.randint(0, 1000, (1, 8), device=device)
    model.token_logprobs(ids, ids).sum().backward()
    optimizer.step()
    times, added = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(dist.broadcast_object(tmp))
        for step in range(1, args.repeats + 1):
            dist.barrier()
            reset_peak(device)
            before = peak_bytes(device)
            t0 = time.perf_counter()
            save_checkpoint(model, optimizer, SimpleNamespace(path=None, eos_ids=[0]), out, step, {}, 1, rank, world)
            times.append(time.perf_counter() - t0)
            added.append(peak_bytes(device) - before)
    if rank == 0:
        row = {"shape": args.shape, "processes": world, "save_s": round(statistics.median(times), 2),
               "rank0_added_gb": round(max(added) / 1e9, 2)}
        print(row)
        save_result("checkpoint", [row], tag=f"_{args.shape}_{world}proc")
    dist.teardown()


if __name__ == "__main__":
    main()
