"""The memory plan's arithmetic (nanotorl/memory.py) against the tensors actually allocated on CPU: the weights,
their AdamW state and gradients, the gathered 16-bit weights, the KV cache, the fused log-prob's backward buffers
and the activations a forward saves for its backward, per layer."""
import platform
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import interpreted
from nanotorl.memory import PhasePeaks, adamw, memory_plan, peak_bytes, sharded_elements
from nanotorl.model import KVCache, Qwen2, Qwen2Config


def tiny(layers=2, **kw) -> Qwen2Config:
    return Qwen2Config(**dict(dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), **kw))


def plan(cfg, N=40, checkpointing=False, world=1):
    return memory_plan(cfg, world, slots=3, cache_len=50, micro_batch_tokens=N, master_dtype=torch.float32,
                       param_dtype=torch.bfloat16, checkpointing=checkpointing).rows


def nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def test_weights_optimizer_gradients_and_kv_cache_as_allocated():
    cfg = tiny()
    model, rows = Qwen2(cfg), plan(cfg)
    model.logits(model(torch.randint(0, 96, (2, 5)))).float().square().mean().backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    params = list(model.parameters())
    assert rows["weights"] == nbytes(params) and rows["gradients"] == nbytes(p.grad for p in params)
    assert rows["optimizer"] == nbytes(v for p in params for v in opt.state[p].values() if v.shape == p.shape)
    assert rows["gathered"] == nbytes(p.bfloat16() for p in params)
    cache = KVCache(cfg, slots=3, max_len=50, dtype=torch.bfloat16)
    assert rows["KV cache"] == cache.k.nbytes + cache.v.nbytes


def test_sharded_weights_by_hand():
    # FSDP2 shards dim 0 padded to a multiple of the ranks: [96, 64] -> 48 rows on 2 ranks, 13 on 8 (of 104)
    assert sharded_elements([torch.Size([96, 64]), torch.Size([64])], 2) == 48 * 64 + 32
    assert sharded_elements([torch.Size([96, 64]), torch.Size([64])], 8) == 12 * 64 + 8
    assert sharded_elements([torch.Size([97, 64])], 8) == 13 * 64


class Allocations(TorchDispatchMode):
    """Bytes of every new storage an op returns (views and in-place results are not new), outside kernel launches."""

    def __init__(self):
        super().__init__()
        self.bytes, self.seen, self.paused = 0, set(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not self.paused:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.bytes += t.untyped_storage().nbytes()
        return out


def step_allocations(make_optimizer) -> tuple[int, list[torch.Tensor]]:
    """Bytes of new tensors the third step of ``make_optimizer(params)`` allocates (its state already built by two
    steps), and the weights after it, on a fixed model and fixed gradients."""
    torch.manual_seed(0)
    params = list(Qwen2(tiny()).init_weights().parameters())
    opt = make_optimizer(params)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        with Allocations() as seen:
            opt.step()
    return seen.bytes, params


def test_the_trainers_adamw_step_allocates_nothing_and_updates_as_the_reference():
    fused, weights = step_allocations(lambda ps: adamw(ps, lr=1e-2, weight_decay=0.1))
    for foreach in (False, True):  # PyTorch's CPU default (a loop over tensors) and its CUDA default (foreach)
        unfused, reference = step_allocations(
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=foreach))
        largest = max(p.nbytes for p in reference)
        assert unfused >= 2 * largest  # sqrt(v), then its division: the size of a parameter each
        for w, ref in zip(weights, reference, strict=True):
            torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    assert fused < 64  # scalars at most


def test_log_prob_backward_buffers_as_allocated(triton_interpreter):
    from triton.runtime.jit import KernelInterface
    lp = interpreted("nanotorl.kernels.logprob")
    cfg, N = tiny(), 40
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, cfg.hidden_size, generator=g).bfloat16()
    w = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g).bfloat16()
    targets = torch.randint(0, cfg.vocab_size, (N,), generator=g)
    lse, coef = torch.randn(N, generator=g), torch.randn(N, generator=g)
    record, launch = Allocations(), KernelInterface.__getitem__

    def unrecorded(kernel, grid):
        def run(*args, **kwargs):
            record.paused = True
            try:
                return launch(kernel, grid)(*args, **kwargs)
            finally:
                record.paused = False
        return run

    with mock.patch.object(KernelInterface, "__getitem__", unrecorded), record:
        lp._fused_backward(h, w, None, targets, lse, coef, 1.0, (True, True, False))
    assert record.bytes == plan(cfg, N)["log-prob"]


def saved_bytes(cfg, N, checkpointing) -> int:
    """Bytes of the distinct storages a bf16 forward of one row of N tokens saves for its backward (weights not
    counted)."""
    model = Qwen2(cfg).init_weights(generator=torch.Generator().manual_seed(0)).bfloat16().train()
    model.activation_checkpointing = checkpointing
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, cfg.vocab_size, (1, N)))
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["all", "checkpointed"])
def test_activations_per_layer_as_saved(checkpointing):
    """One more layer adds what the plan says: the block's input when checkpointed, else all it saves."""
    N = 48
    measured = saved_bytes(tiny(3), N, checkpointing) - saved_bytes(tiny(2), N, checkpointing)
    planned = (plan(tiny(3), N, checkpointing)["activations"] - plan(tiny(2), N, checkpointing)["activations"])
    assert measured == planned


def test_released_generator_allocates_again_and_generates_the_same(tmp_path):
    from nanotorl.demo import save_demo_tokenizer
    from nanotorl.generate import Generator, Request, SamplingParams
    from nanotorl.tokenizer import Tokenizer
    save_demo_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    model = Qwen2(tiny(vocab_size=tok.vocab_size)).init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    gen = Generator(model.eval(), tok, slots=2, max_len=32)
    reqs = [Request(tok.encode(f"{i} + {i} ="), max_new_tokens=6, sampling=SamplingParams(temperature=0.0))
            for i in range(3)]
    first = [o.response_ids for o in gen.generate(reqs)]
    assert gen.cache is not None
    gen.release()
    assert gen.cache is None and gen.table is None
    assert [o.response_ids for o in gen.generate(reqs)] == first


@pytest.mark.parametrize("keep", [False, True], ids=["freed", "kept"])
def test_rollout_step_frees_the_kv_cache_before_train_step_unless_kept(keep, monkeypatch):
    import train
    from nanotorl.config import RolloutConfig, TrainConfig
    from nanotorl.data import Problem

    class Gen:
        released = 0

        def release(self):
            self.released += 1

    monkeypatch.setattr(train, "rollout", lambda gen, draws, **kw: draws)
    gen, cfg = Gen(), TrainConfig(prompts_per_step=2, rollout=RolloutConfig(keep_kv_cache=keep))
    problems = [Problem(str(i), f"{i} + 1", str(i + 1)) for i in range(4)]
    assert len(train.rollout_step(Qwen2(tiny()), gen, problems, 0, cfg, 0, 1)) == 2 * cfg.grpo.group_size
    assert gen.released == (0 if keep else 1)


# ------------------------------------------------------------------ measured peaks (PhasePeaks)

BIG = 400 << 20  # bytes: far above the noise of a Python process's own allocations


def allocate_and_free(nbytes: int) -> None:
    block = torch.ones(nbytes // 4)  # written: the pages are resident
    assert block.sum() > 0


def test_each_phase_counts_its_own_peak_and_a_new_phase_starts_from_the_current_memory():
    cpu = torch.device("cpu")
    peaks = PhasePeaks(cpu)
    peaks.start()
    base = peak_bytes(cpu)
    allocate_and_free(BIG)
    peaks.end("big")
    allocate_and_free(BIG // 8)
    peaks.end("small")
    gb = peaks.take()
    assert gb["memory_big_gb"] * 1e9 >= base + BIG * 0.95
    assert gb["memory_small_gb"] * 1e9 < base + BIG / 2  # the big phase's peak was forgotten
    assert peaks.take() == {}


FRAGMENTS = textwrap.dedent("""
    import re, sys, torch
    from nanotorl.memory import return_freed_tensors
    if sys.argv[1] == "fixed":
        assert return_freed_tensors()
    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    big = torch.empty(5 * 2**20)
    del big  # 20 MiB freed: glibc's threshold for pages of their own rises to 20 MiB
    freed, kept = [], []
    for _ in range(40):  # 12 MiB tensors, each below a live one: 480 MiB to free
        freed.append(torch.ones(3 * 2**20)); kept.append(torch.ones(3 * 2**20))
    before = rss()
    del freed
    print(before - rss())
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator thresholds; this C library is not glibc")
@pytest.mark.parametrize("mode", ["default", "fixed"])
def test_freed_tensors_leave_the_resident_set_once_the_threshold_is_fixed(mode):
    """The training process's setting (train.py calls return_freed_tensors) against glibc's default: 40 freed
    tensors of 12 MiB, each with a live one above it, leave the resident set only with the threshold fixed."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, check=True)
    released = int(out.stdout) / (480 * 2**20)
    assert released > 0.95 if mode == "fixed" else released < 0.05, out.stdout
