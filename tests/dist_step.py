"""One GRPO optimizer step on a fixed global batch, run by tests/test_train.py under torchrun with 1 or 2
processes, with right-padded rows or (argv[2] == "pack") packed ones, or (argv[2] == "nan1", by
tests/test_faults.py) with a NaN log-prob in rank 1's samples only; rank 0 saves the resulting weights to argv[1]."""
import sys

import torch

import train
from nanotorl import dist
from nanotorl.config import OptimConfig, TrainConfig
from nanotorl.data import Problem
from nanotorl.generate import Completion, ToolCall
from nanotorl.grpo import GRPOConfig
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.rollout import Sample


def global_batch(cfg: TrainConfig) -> list[Sample]:
    """Deterministic responses of varied lengths with tool tokens (mask 0) and varied rewards."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(cfg.prompts_per_step * cfg.grpo.group_size):
        prompt = torch.randint(1, 50, (3 + i % 3,), generator=g).tolist()
        n = 4 + (i * 7) % 9
        response = torch.randint(1, 50, (n,), generator=g).tolist()
        mask = [1] * n
        if i % 3 == 0:
            mask[1:3] = [0, 0]
        logprobs = (-torch.rand(n, generator=g)).tolist()
        completion = Completion(prompt, response, mask, logprobs, [ToolCall("", "ok", "", 0.0)], "eos")
        reward = 1.0 if torch.rand(1, generator=g).item() < 0.4 else -1.0
        samples.append(Sample(Problem(str(i), "", ""), completion, None, reward > 0, reward))
    return samples


def main(out, mode: str):
    rank, world, device = dist.setup()
    cfg = TrainConfig(prompts_per_step=4, grpo=GRPOConfig(group_size=4),
                      optim=OptimConfig(micro_batch_tokens=40, pack_rows=mode == "pack", lr=1.0))
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).init_weights(std=0.2)
    model = dist.shard(model)
    # plain SGD: the weights after one step show the gradient itself (Adam would blow up float noise in
    # gradients that are zero in exact arithmetic, like the key bias's)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    mine, _ = dist.shard_of(global_batch(cfg), rank, world, cfg.grpo.group_size)
    if mode == "nan1" and rank == 1:
        mine[0].completion.logprobs[0] = float("nan")
    stats = train.train_step(model, opt, mine, cfg, device, world)
    weights = dist.full_state_dict(model)
    if rank == 0:
        torch.save({"weights": weights, "stats": stats}, out)
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    dist.end_process(0)  # no interpreter finalisation: nanotorl.dist.end_process says why
