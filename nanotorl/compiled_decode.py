"""The CPU decoding forward compiled whole: one token per row, its prefix read from the KV cache, nothing written.

On a CPU, a decoding forward of a small model is mostly per-op cost: ~300 PyTorch ops (module calls, norms, RoPE,
views, cache writes) around a few matrix products. ``torch.compile`` (inductor) fuses the elementwise ops into C++
loops and leaves the products to the BLAS, but it cannot take the generator's forward whole: it writes the new keys
and values into the cache in place, which inductor turns into a copy of the whole cache per step
(nanotorl/decode_step.py). So this forward is functional. Each row attends to its prefix, read from a window of the
cache (a view where the rows' slots are consecutive), and to its own new key and value, held apart from the window:
softmax over [prefix scores, own score], then the prefix's values and its own value weighted by those. It returns
the new keys and values, and :class:`CompiledDecode` writes them into the cache with one indexed write per tensor
after the compiled call. The result is the eager forward's to float rounding (the own score is a separate dot
product; tests/test_compiled_decode.py).

Rows and prefix length are dynamic shapes (each its own symbol: no "duck sizing", which would tie the prefix
length to the head size when they happen to be equal), so a few compiles serve a whole run: one for a single row,
one for rows read as a view of the cache, one for a gathered window, and one more when the first compile saw every
slot decoding (the window's stride then equals rows x its inner strides, and dynamo guards on that). On with
``Generator(compile=True)`` (eval.py ``--compile``, the benchmarks' ``--compile``); the first forwards compile
(seconds to tens of seconds on a CPU core; inductor caches its part on disk, dynamo traces anew in every process),
so it pays off on long runs only. On the demo model, one thread: 2.4x HF ``generate``'s tokens/s at batch 1, 1.8x
at 16, 1.4x at 64, against 1.4x, 1.3x, 1.2x eager (``python -m bench.generate --quick --compile``, warm-up
excluded); ``eval.py`` on the demo's held-out set, compiling included: 2.6 s eager, 40.6 s compiled, 7.9 s with
inductor's cache warm (README, "Rollout speed", round 4).
"""
import math
import shutil

import torch
import torch._inductor.config as inductor_config
import torch.fx.experimental._config as shape_config

from nanotorl.model import KVCache, rope, rope_tables


def attend_prefix(q, k, v, keys, values, bias):
    """softmax(q K^T / sqrt(d) + bias) V for one new token per row over [its prefix, itself].

    q [B, Hq, d]; k, v [B, Hkv, d], the row's own new key and value; keys, values [B, Hkv, S, d], its prefix;
    bias [B * Hkv, 1, S]: 0 where the prefix holds the row's own positions, -inf past them. Returns [B, Hq, d]."""
    B, Hq, d = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B * Hkv, Hq // Hkv, d)  # the G query heads of a KV head are G query rows of it
    keys, values = keys.flatten(0, 1).to(q.dtype), values.flatten(0, 1).to(q.dtype)  # [B * Hkv, S, d]
    prefix = torch.baddbmm(bias, qg, keys.mT, alpha=d ** -0.5)                          # [B * Hkv, G, S]
    own = (qg * k.reshape(B * Hkv, 1, d)).sum(-1, keepdim=True) * d ** -0.5              # [B * Hkv, G, 1]
    p = torch.cat([prefix, own], -1).float().softmax(-1).to(q.dtype)
    out = torch.baddbmm(p[..., -1:] * v.reshape(B * Hkv, 1, d), p[..., :-1], values)  # [B * Hkv, G, d]
    return out.view(B, Hq, d)


def decode_forward(model, ids, positions, keys, values):
    """One decoding token per row through ``model`` (a ``nanotorl.model.Qwen2``), writing nothing.

    ids, positions [B]; keys, values [L, B, Hkv, S, d]: each row's prefix, positions 0..S-1 of its slot (those at
    or past its own position are masked out). Returns the final hidden states [B, D] and the new keys and
    values [B, L, Hkv, d] (the layout an indexed write into the cache takes)."""
    B, S = ids.shape[0], keys.shape[3]
    past = torch.arange(S, device=ids.device) >= positions[:, None, None]  # [B, 1, S]
    bias = torch.zeros(past.shape, device=ids.device, dtype=keys.dtype).masked_fill(past, -math.inf)
    bias = bias.repeat_interleave(keys.shape[2], 0)  # [B * Hkv, 1, S]
    x = model.embed_tokens(ids)
    rot = rope_tables(positions, model.cfg.head_dim, model.cfg.rope_theta, x.dtype)  # [B, 1, d]
    new_k, new_v = [], []
    for block in model.layers:
        a = block.self_attn
        h = block.input_layernorm(x)
        q = rope(a.q_norm(a.q_proj(h).view(B, a.n_heads, a.head_dim)), rot)
        k = rope(a.k_norm(a.k_proj(h).view(B, a.n_kv, a.head_dim)), rot)
        v = a.v_proj(h).view(B, a.n_kv, a.head_dim)
        out = attend_prefix(q, k, v, keys[a.layer], values[a.layer], bias)
        x = x + a.o_proj(out.flatten(-2))
        x = x + block.mlp(block.post_attention_layernorm(x))
        new_k.append(k)
        new_v.append(v)
    return model.norm(x), torch.stack(new_k, 1), torch.stack(new_v, 1)


def cxx_choices() -> list[str]:
    """The C++ compilers inductor would build the compiled forward with (its ``cpp.cxx`` setting), in its order."""
    cxx = inductor_config.cpp.cxx
    return [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]


def cxx_compiler() -> str | None:
    """The first of :func:`cxx_choices` on PATH, if any."""
    return next(filter(None, map(shutil.which, cxx_choices())), None)


class CompiledDecode:
    """The decoding forward of ``model``, compiled on first use (``torch.compile``; rows and prefix length dynamic).

    ``model``: a :class:`nanotorl.model.Qwen2` (compiled: :func:`decode_forward` over it), or a wrapper of one that
    has its own ``decode(ids, positions, keys, values)`` with :func:`decode_forward`'s contract (one that adds to
    the hidden states the generator's ``model.logits`` reads, say)."""

    def __init__(self, model):
        if cxx_compiler() is None:
            raise RuntimeError(f"compile=True: torch.compile builds the CPU forward with a C++ compiler, and none of "
                               f"{cxx_choices()} is on PATH; install one (apt-get install g++) or decode without "
                               f"compiling")
        decode = getattr(model, "decode", None) or (lambda *args: decode_forward(model, *args))
        self.forward = torch.compile(decode, dynamic=False)

    def __call__(self, cache: KVCache, ids, positions, slots):
        """ids, positions, slots [B] (slots ascending, each once): write each row's new key and value into ``cache``
        at its slot and position, as the eager forward does; return the final hidden states [B, D]."""
        B, S, lo = len(ids), cache.last_position(positions), int(slots[0])
        rows = slice(lo, lo + B) if int(slots[-1]) - lo + 1 == B else slots  # consecutive: a view, not a copy
        keys, values = cache.k[:, rows, :, :max(S, 1)], cache.v[:, rows, :, :max(S, 1)]
        for t, dims in ((ids, (0,)), (positions, (0,)), (keys, (1, 3)), (values, (1, 3))):
            for dim in dims:  # B and S only (the rest stays fixed), each a symbol of its own (no duck sizing)
                torch._dynamo.maybe_mark_dynamic(t, dim)
        with shape_config.patch(use_duck_shape=False):
            h, new_k, new_v = self.forward(ids, positions, keys, values)
        cache.k[:, slots, :, positions] = new_k.to(cache.k.dtype)
        cache.v[:, slots, :, positions] = new_v.to(cache.v.dtype)
        return h
