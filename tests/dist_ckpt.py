"""Training checkpoints under torchrun with 1 or 2 processes, run by tests/test_checkpoint.py.

    dist_ckpt.py save OUT      two AdamW steps, a checkpoint in OUT/run, the full states in OUT/saved.pt
    dist_ckpt.py resume OUT    resume OUT/run's checkpoint, the full states in OUT/resumed<world>.pt
    dist_ckpt.py memory OUT    a bigger model: each rank's peak RSS during the save in OUT/memory<rank>.json
"""
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from nanotorl import dist
from nanotorl.checkpoint import load_model
from nanotorl.training_checkpoint import latest_checkpoint, resume, save_checkpoint
from nanotorl.model import Qwen2, Qwen2Config

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
BIG = dict(SMALL, vocab_size=8192, hidden_size=512, intermediate_size=1024)  # 13.5M parameters, 54 MB in fp32
TOKENIZER = SimpleNamespace(path=None, eos_ids=[0])


def full_states(model, optimizer) -> dict:
    """The whole model's weights and optimizer state (gathered: this is the test's reference, not the save)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.distributed() else None
    return {"weights": dist.full_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer,
                                                                                           options=options)}


def trained(shape: dict, steps: int):
    torch.manual_seed(0)
    model = dist.shard(Qwen2(Qwen2Config(**shape)).init_weights(std=0.2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        ids = torch.randint(0, shape["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(step))
        model.token_logprobs(ids, ids.roll(-1, 1)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def main(mode: str, out: Path):
    rank, world, _ = dist.setup()
    run = out / "run"
    if mode == "save":
        model, optimizer = trained(SMALL, steps=2)
        save_checkpoint(model, optimizer, TOKENIZER, run, 2, {"seed": 0}, keep=1, rank=rank, world=world)
        states = full_states(model, optimizer)
        name = "saved.pt"
    elif mode == "resume":
        ckpt = latest_checkpoint(run)
        model = dist.shard(load_model(ckpt))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        step = resume(model, optimizer, ckpt, rank, world)
        states = full_states(model, optimizer) | {"step": step}
        name = f"resumed{world}.pt"
    else:
        model, optimizer = trained(BIG, steps=1)
        shard_bytes = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
                          for state in optimizer.state.values() for t in state.values() if t.dim())
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")  # peak RSS := current RSS
        before = rss_kb("VmRSS")
        save_checkpoint(model, optimizer, TOKENIZER, run, 1, {"seed": 0}, keep=1, rank=rank, world=world)
        (out / f"memory{rank}.json").write_text(json.dumps({"added": (rss_kb("VmHWM") - before) * 1024,
                                                            "optimizer_shard": shard_bytes}))
        states, name = None, None
    if rank == 0 and name:
        torch.save(states, out / name)
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    dist.end_process(0)  # no interpreter finalisation: nanotorl.dist.end_process says why
