"""The compiled CPU decoding forward (nanotorl/compiled_decode.py) against the eager cached forward of the model.

The generator's own tests run it too (tests/test_generate.py, the "compiled" decoding: greedy against a naive
full recompute, end ids, paused and free slots among the decoding ones)."""
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import needs_cxx
from nanotorl import compiled_decode
from nanotorl.compiled_decode import CompiledDecode
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Generator, Request
from nanotorl.model import KVCache
from nanotorl.tokenizer import Tokenizer
from test_generate import QWEN3, tiny_model

VOCAB = 50


def junk_cache(model, slots=10, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(model.cfg, slots, length)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


@needs_cxx
@pytest.mark.parametrize("arch", [{}, QWEN3], ids=["qwen2", "qwen3"])
def test_compiled_decoding_forward_equals_the_eager_one(arch):
    """Rows of consecutive slots (a view of the cache), scattered slots (a gathered window) and a single row, at
    positions from 0 (a one-token prompt: no prefix) to near the cache's end, on a cache filled with junk: the
    same hidden states as the eager forward, the same keys and values written at each row's slot and position,
    and nothing else in the cache touched."""
    model = tiny_model(VOCAB, seed=1, **arch)
    compiled = CompiledDecode(model)
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(2)
    for slots, positions in ([2, 3, 4, 5, 6], [0, 17, 3, 38, 9]), ([0, 3, 4, 9], [5, 0, 21, 30]), ([7], [12]):
        slots, positions = torch.tensor(slots), torch.tensor(positions)
        ids = torch.randint(0, VOCAB, (len(slots),), generator=g)
        eager_cache, cache = junk_cache(model), junk_cache(model)
        with torch.inference_mode():
            want = model(ids[:, None], positions=positions[:, None], cache=eager_cache, slots=slots)[:, 0]
            got = compiled(cache, ids, positions, slots)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        written = torch.zeros(cache.k.shape[1:4], dtype=torch.bool)  # [slots, Hkv, positions]
        written[slots, :, positions] = True
        for new, ref in ((cache.k, eager_cache.k), (cache.v, eager_cache.v)):
            assert torch.equal(new[:, ~written], ref[:, ~written])
            torch.testing.assert_close(new[:, written], ref[:, written], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile (no silent fallback to eager)


@needs_cxx
def test_compiled_forward_reads_the_weights_as_they_are_now():
    """A trainer updates the weights in place between rollouts: the compiled forward must read them anew, not
    keep the values it was compiled with."""
    model = tiny_model(VOCAB, seed=4)
    compiled = CompiledDecode(model)
    ids, positions, slots = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([0, 1, 2])
    with torch.inference_mode():
        before = compiled(junk_cache(model), ids, positions, slots)
        for p in model.parameters():
            p.mul_(1.5)
        after = compiled(junk_cache(model), ids, positions, slots)
        want = model(ids[:, None], positions=positions[:, None], cache=junk_cache(model), slots=slots)[:, 0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)


def test_compile_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    """A model that is not a Qwen2 (and has no decode of its own), a model off the CPU: refused, saying why."""
    save_demo_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    monkeypatch.setattr(compiled_decode, "cxx_compiler", lambda: "/usr/bin/g++")  # whatever this machine has
    with pytest.raises(TypeError, match="no decode"):
        Generator(torch.nn.Linear(2, 2), tok, compile=True)
    model = tiny_model(tok.vocab_size).to("meta")
    with pytest.raises(ValueError, match="CPU decoding forward; the model is on meta"):
        Generator(model, tok, compile=True).generate([Request(tok.encode("Q"), max_new_tokens=2)])


def test_compile_without_a_cxx_compiler_says_so_at_once(tmp_path, monkeypatch):
    save_demo_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    with pytest.raises(RuntimeError, match=r"compile=True: .* C\+\+ compiler, and none of \['g\+\+'\] is on PATH"):
        Generator(tiny_model(tok.vocab_size), tok, compile=True)


def test_a_position_past_the_cache_is_refused_by_both_forwards(monkeypatch):
    """KVCache.last_position: the eager and the compiled forward refuse a position the cache cannot hold, before
    anything runs."""
    monkeypatch.setattr(compiled_decode, "cxx_compiler", lambda: "/usr/bin/g++")  # refused before compiling
    model = tiny_model(VOCAB)
    cache, compiled = KVCache(model.cfg, 4, 8), CompiledDecode(model)
    ids, slots, past = torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([3, 8])
    with torch.inference_mode():
        with pytest.raises(ValueError, match="position 8 does not fit a cache of length 8"):
            model(ids[:, None], positions=past[:, None], cache=cache, slots=slots)
        with pytest.raises(ValueError, match="position 8 does not fit a cache of length 8"):
            compiled(cache, ids, past, slots)
        assert cache.last_position(torch.tensor([3, 7])) == 7
