"""FSDP2 around generation, run by tests/test_dist.py under torchrun (gloo, CPU); rank 0 saves what it saw to
argv[1] as JSON:
  resharded   which parameters a forward outside generation leaves sharded (DTensors), before any
              ``dist.gathered`` and after two of them: the root's (embedding, norm, head) stay whole, the blocks'
              are sharded again
  fsdp_hooks  calls of FSDP2's pre-forward (root and per group) inside generation with ``cuda_graph`` and
              without (eager: prefills and decoding), and outside generation
  steps       decode steps run; every one under ``host_sync.no_host_sync``
  same        the tokens of the sharded model decoding with ``cuda_graph`` (the captured step, interpreted
              Triton kernels) and eagerly equal an unsharded copy's; logprob_diff is the largest log-prob difference
"""
import copy
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the decode step's kernels, interpreted

import torch  # noqa: E402
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup  # noqa: E402
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from host_sync import no_host_sync  # noqa: E402
from nanotorl import dist  # noqa: E402
from nanotorl.decode_step import DecodeStep  # noqa: E402
from nanotorl.demo import save_demo_tokenizer  # noqa: E402
from nanotorl.generate import Generator, Request, SamplingParams  # noqa: E402
from nanotorl.model import Qwen2, Qwen2Config  # noqa: E402
from nanotorl.tokenizer import Tokenizer  # noqa: E402

CALLS = {"graph": 0, "eager": 0, "outside": 0}
WHERE = ["outside"]  # where FSDP2's hooks are counted now


def counted(fn):
    def call(*args, **kwargs):
        CALLS[WHERE[0]] += 1
        return fn(*args, **kwargs)
    return call


def checked_run(run, steps):
    def step(self):
        with no_host_sync():
            run(self)
        steps.append(1)
    return step


def labelled(generate):
    def call(self, *args, **kwargs):
        WHERE[0] = "graph" if self.cuda_graph else "eager"
        try:
            return generate(self, *args, **kwargs)
        finally:
            WHERE[0] = "outside"
    return call


def resharded(model) -> dict:
    """Which parameters are sharded after a forward outside generation."""
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return {"root": isinstance(model.embed_tokens.weight, DTensor),
            "blocks": all(isinstance(p, DTensor) for p in model.layers.parameters())}


def main(out, tok_dir):
    rank, _, _ = dist.setup()
    if rank == 0:
        save_demo_tokenizer(tok_dir)
    dist.barrier()
    tok = Tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    reference = Qwen2(cfg).init_weights(std=0.3).eval()
    model = dist.shard(copy.deepcopy(reference))
    seen = {"resharded": [resharded(model)]}
    FSDPState._root_pre_forward = counted(FSDPState._root_pre_forward)
    FSDPParamGroup.pre_forward = counted(FSDPParamGroup.pre_forward)
    steps = []
    DecodeStep._run = checked_run(DecodeStep._run, steps)
    Generator.generate = labelled(Generator.generate)
    reqs = [Request(tok.encode(f"What is {i} + {i}?"), max_new_tokens=4, seed=i,
                    sampling=SamplingParams(temperature=float(i % 2))) for i in range(2)]
    outs = []
    for graph in (True, True, False):
        with dist.gathered(model), torch.no_grad():
            model.eval()
            outs.append(Generator(model, tok, slots=2, max_len=48, cuda_graph=graph).generate(reqs))
    seen["resharded"].append(resharded(model))
    with torch.no_grad():
        want = Generator(reference, tok, slots=2, max_len=48).generate(reqs)
    pairs = [(o, w) for out in outs[1:] for o, w in zip(out, want)]
    seen |= {"fsdp_hooks": CALLS, "steps": len(steps), "same": all(o.response_ids == w.response_ids for o, w in pairs),
             "logprob_diff": max(abs(a - b) for o, w in pairs for a, b in zip(o.logprobs, w.logprobs)),
             "counts": dist.all_counts({f"only on rank {rank}": rank + 1, "on both": 10})}  # keys differ by rank
    if rank == 0:
        with open(out, "w") as f:
            json.dump(seen, f)
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    dist.end_process(0)  # no interpreter finalisation: nanotorl.dist.end_process says why
